"""Paraphrase task for sentence encoders (used with all-MiniLM-L6-v2).

Each example is a triple ``(sentence, paraphrase, unrelated sentence)``. The metric is the
paraphrase margin ``cos(e, paraphrase) - cos(e, unrelated)`` of the sentence's embedding ``e``:
an intervention that hurts the encoder's sense of meaning lowers it. The two reference
embeddings are computed once, on the clean model, and travel in the batch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..metrics import CallableMetric

__all__ = ["PARAPHRASE_TRIPLES", "mean_pool", "embed", "paraphrase_margin_metric", "paraphrase_batch"]

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


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings ``[B, d]``: mean of token states ``[B, T, d]`` over real tokens
    (``attention_mask`` ``[B, T]``, 1 = real token; the pooling all-MiniLM-L6-v2 was trained with)."""
    w = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1e-9)


@torch.no_grad()
def embed(model, tokenizer, sentences: Sequence[str]) -> torch.Tensor:
    """Unit-norm sentence embeddings ``[len(sentences), d]`` of the (unmodified) encoder."""
    enc = tokenizer(list(sentences), padding=True, return_tensors="pt")
    out = model(**enc).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(out, enc["attention_mask"]), dim=-1)


def paraphrase_margin_metric() -> CallableMetric:
    """Per example: ``cos(e, paraphrase) - cos(e, unrelated)`` where ``e`` is the (intervened)
    embedding of the sentence and the two references are clean embeddings in the batch
    (``batch["paraphrase"]``, ``batch["unrelated"]``: ``[B, d]``, unit norm)."""

    def margin(hidden: torch.Tensor, batch: dict) -> torch.Tensor:
        e = torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
        return (e * batch["paraphrase"]).sum(-1) - (e * batch["unrelated"]).sum(-1)

    return CallableMetric(margin, name="paraphrase_margin")


def paraphrase_batch(model, tokenizer, triples: Sequence[tuple[str, str, str]] = PARAPHRASE_TRIPLES) -> dict:
    """The scan inputs for ``triples``: the first sentences tokenized (``input_ids``,
    ``attention_mask``, ``token_type_ids``: ``[B, T]``, right-padded) plus the clean embeddings
    ``paraphrase`` and ``unrelated`` ``[B, d]`` the metric compares against."""
    first = [t[0] for t in triples]
    enc = tokenizer(first, padding=True, return_tensors="pt")
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_type_ids": enc.get("token_type_ids", torch.zeros_like(enc["input_ids"])),
        "paraphrase": embed(model, tokenizer, [t[1] for t in triples]),
        "unrelated": embed(model, tokenizer, [t[2] for t in triples]),
    }
