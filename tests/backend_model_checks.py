"""Whole-model checks shared by the kernel backends' test suites: a tiny GPT-2 and a tiny
Llama (GQA) under ``headint.intervene`` give the same logits with a kernel backend as with
the reference backend, with a different set of interventions in every batch row."""

from __future__ import annotations

import torch

import headint
import tiny_models as tm

T = 9


def per_row_interventions(n_heads: int, cache) -> list[list]:
    """Row i carries its own interventions: ablation, patching, scaling, knockouts, score scale."""
    return [
        [headint.Ablate(layer=0, head=1)],
        [headint.Patch(layer=1, head=2, source=cache), headint.Scale(layer=0, head=0, factor=0.3)],
        [headint.Knockout(queries=[T - 1, T - 2], keys=[0, 1, 2], layer=1, head=None)],
        [headint.Scale(layer=1, head=3, target="scores", factor=2.0), headint.Ablate(layer=0, head=2, positions=[4, 5])],
        [],
        [headint.Knockout(queries=None, keys=list(range(T)), layer=0, head=1)],  # every key removed: zero head output
    ]


def check_model(name: str, backend: str, atol: float = 2e-5) -> None:
    tiny = tm.get(name)
    model = tiny.model
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tm.VOCAB, (6, T), generator=g)
    mask = torch.ones_like(ids)
    mask[4, :3] = 0  # a left-padded row
    corrupt = torch.randint(0, tm.VOCAB, (6, T), generator=g)
    cache = headint.record(model, corrupt, what=("z",), backend="reference")
    rows = per_row_interventions(tiny.n_heads, cache)
    with torch.no_grad():
        with headint.intervene(model, rows, backend="reference"):
            ref = model(input_ids=ids, attention_mask=mask).logits
        with headint.intervene(model, rows, backend=backend):
            out = model(input_ids=ids, attention_mask=mask).logits
        with headint.intervene(model, [], backend=backend):
            plain = model(input_ids=ids, attention_mask=mask).logits
        plain_ref = model(input_ids=ids, attention_mask=mask).logits
    assert headint.last_backend() == backend
    real = mask.bool()  # padded query positions are not compared
    torch.testing.assert_close(out[real], ref[real], atol=atol, rtol=1e-5)
    torch.testing.assert_close(plain[real], plain_ref[real], atol=atol, rtol=1e-5)
    # the interventions did something in every row that has one
    for i, r in enumerate(rows):
        changed = (ref[i][real[i]] - plain_ref[i][real[i]]).abs().max() > 1e-4
        assert changed == bool(r), f"row {i}: interventions {r} changed={changed}"


def check_attribution(name: str, backend: str) -> None:
    tiny = tm.get(name)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, tm.VOCAB, (4, 7), generator=g)
    cor = ids.clone()
    cor[:, 2] = torch.randint(0, tm.VOCAB, (4,), generator=g)
    tgt, con = torch.randint(0, tm.VOCAB, (4,), generator=g), torch.randint(0, tm.VOCAB, (4,), generator=g)
    clean = {"input_ids": ids, "target": tgt, "contrast": con}
    corrupt = {"input_ids": cor, "target": tgt, "contrast": con}
    for per_position in (False, True):
        ref = headint.attribution_scan(tiny.model, clean, corrupt, "logit_diff", per_position=per_position, backend="reference")
        out = headint.attribution_scan(tiny.model, clean, corrupt, "logit_diff", per_position=per_position, backend=backend)
        torch.testing.assert_close(out.per_example, ref.per_example, atol=2e-5, rtol=1e-4)
