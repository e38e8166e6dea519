"""Shipped model checkpoints and their loaders (nothing else: task data and training live in
:mod:`headint.tasks`, experiments in :mod:`headint.experiments`).

``induction-2l``
    A 2-layer, 4-heads-per-layer GPT-2 decoder (d_model 64, vocabulary 128, 64
    positions, ~59k parameters), attention-only (its MLPs are zero), trained from
    scratch by :mod:`headint.tasks.train_induction` on the synthetic in-context
    copying task of :mod:`headint.tasks.induction`.  It holds a real induction
    circuit -- previous-token heads in layer 0 (L0H0, and L0H1, a backup that only
    matters once L0H0 is gone) whose output the induction heads in layer 1 (L1H3,
    L1H2, L1H0) read -- and bystander heads pruned during training (weights ~0,
    near-uniform attention, no output), so it is a small ground truth for causal
    head scans, redundancy included.  ``model_dir("induction-2l") / "training.json"`` records how it was
    trained and its pattern scores.

``tracr-reverse``, ``tracr-xproportion``
    tracr-compiled programs (``lib.make_reverse``, ``lib.make_frac_prevs``) as
    :class:`headint.models.tracr_model.TracrForCausalLM` (no layer norm, bidirectional
    attention), with their ground-truth edges for resample ablation in ``ground_truth.json``;
    rebuilt by ``python -m headint.models.tracr_build`` (optional extra ``tracr``).

``all-MiniLM-L6-v2`` (optional extra ``minilm``)
    :func:`headint.models.minilm.load_minilm` loads the real pretrained sentence encoder.

Example::

    from headint import models
    model = models.load("induction-2l")        # GPT2LMHeadModel, eval mode
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["load", "available", "model_dir", "DEFAULT_MODEL"]

DEFAULT_MODEL = "induction-2l"
_PACKAGE_DIR = Path(__file__).resolve().parent


def available() -> list[str]:
    """Names of the embedded models (sub-directories holding a ``config.json``)."""
    return sorted(p.name for p in _PACKAGE_DIR.iterdir() if p.is_dir() and (p / "config.json").is_file())


def model_dir(name: str = DEFAULT_MODEL) -> Path:
    """Directory holding the checkpoint of the embedded model ``name``.

    Raises:
        ValueError: if ``name`` is not an embedded model.
    """
    names = available()
    if not isinstance(name, str) or name not in names:
        raise ValueError(f"unknown embedded model {name!r}; available models: {', '.join(names) or '(none)'}")
    return _PACKAGE_DIR / name


def load(name: str = DEFAULT_MODEL, **kwargs):
    """Load an embedded model in eval mode (``induction-2l``: a ``transformers.GPT2LMHeadModel``;
    ``tracr-*``: a :class:`~headint.models.tracr_model.TracrForCausalLM`).

    Args:
        name: embedded model name (see :func:`available`).
        **kwargs: forwarded to ``GPT2LMHeadModel.from_pretrained`` (e.g.
            ``attn_implementation="eager"``, ``dtype=torch.float64``).

    Raises:
        ValueError: if ``name`` is not an embedded model.
    """
    path = model_dir(name)
    if name.startswith("tracr-"):
        from .tracr_model import TracrForCausalLM as cls
    else:
        from transformers import GPT2LMHeadModel as cls

    model = cls.from_pretrained(str(path), **kwargs)
    model.eval()
    return model
