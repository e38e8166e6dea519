"""all-MiniLM-L6-v2 paraphrase experiment: each head's effect on how well the encoder
separates paraphrases from non-paraphrases (needs the optional extra ``minilm``)."""

from __future__ import annotations

from ..models.minilm import load_minilm
from ..results import ScanResult
from ..scans import scan
from ..tasks.paraphrase import PARAPHRASE_TRIPLES, paraphrase_batch, paraphrase_margin_metric

__all__ = ["paraphrase_scan"]


def paraphrase_scan(model=None, tokenizer=None, triples=PARAPHRASE_TRIPLES, *, method: str = "mean", **scan_kwargs) -> ScanResult:
    """Each head's effect on the paraphrase margin of all-MiniLM-L6-v2 (ablating it in the
    first sentence of each triple; the references stay clean). ``model``/``tokenizer`` default
    to :func:`headint.models.minilm.load_minilm`; ``scan_kwargs`` go to :func:`headint.scan`
    (``progress`` defaults to False). Returns a ``("layer", "head")`` :class:`ScanResult`."""
    if (model is None) != (tokenizer is None):
        raise ValueError(
            "paraphrase_scan needs both model and tokenizer, or neither (to load all-MiniLM-L6-v2); got "
            f"model={'None' if model is None else type(model).__name__}, "
            f"tokenizer={'None' if tokenizer is None else type(tokenizer).__name__}"
        )
    if model is None:
        model, tokenizer = load_minilm()
    inputs = paraphrase_batch(model, tokenizer, triples)
    scan_kwargs.setdefault("progress", False)
    return scan(model, inputs, paraphrase_margin_metric(), method=method, **scan_kwargs)
