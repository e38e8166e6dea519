"""The one description of a call's edits (``headint.interventions.edits``) and what loops over it.

- per-row plans stacked into one batch lose nothing: every edit kind (output replace / scale /
  add, score scales, knockouts, q/k/v replacements, attention-pattern replacements), each row
  different, gives each row what it gives alone, on GPT-2, Llama (GQA) and DeepSeek-V3 (MLA:
  value head dim 12, query/key 24); per-row pattern edits against an eager oracle;
- MLA ``target="v"`` scans (value head dim, not the query/key one; per position with the
  model's own cached latents as the prefix) against a hook oracle on the projection the values
  come from;
- stacking fills, windows, the allow-lists of the scans' shortcuts (an edit a shortcut does not
  understand is refused, never run wrong; every edit kind is reviewed for them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import headint
from headint import Ablate, Knockout, Patch, PatchQKV, Scale
from headint.interventions.edits import EDITS, CallPlan, PatternEdit, Replacement, axis_sizes, replace_input
from headint.plan import TensorPlan
from headint.scans.runner import VariantRunner
from headint.scans.shortcuts import CLEAN_ATTENTION_EDITS, PER_POSITION_EDITS, Shortcuts
from headint.shape import LayerShape
from scan_oracles import corrupt_of, make_batch, tiny_gpt2, tiny_llama

sys.path.insert(0, str(Path(__file__).parent / "backends"))
from test_backend_models_softcap_sinks_vdim import make_deepseek_v3  # noqa: E402

BACKEND = "reference"
T = 6


@dataclass(frozen=True, eq=False)
class PatchPattern(headint.Intervention):
    """Replace ``head``'s attention probabilities at ``layer`` by ``probs [B or 1, T, T]`` (rows:
    absolute query positions, columns: absolute key positions) - a user's own kind."""

    layer: int
    head: int
    probs: Any

    def lower(self, call):
        p = call.batch(self.probs, "PatchPattern.probs")  # [Bs, T, T]
        p = p[:, call.q_positions][:, :, call.k_positions]
        call.replace_pattern(call.select(self.head), p[:, None].expand(-1, call.shape.n_heads, -1, -1))


@dataclass(frozen=True, eq=False)
class Steer(headint.Intervention):
    layer: int
    head: int
    vector: Any

    def lower(self, call):
        call.add_output(call.select(self.head), self.vector)


MODELS = {"gpt2": lambda: tiny_gpt2(seed=4), "llama": lambda: tiny_llama(seed=4), "deepseek_v3": make_deepseek_v3}
_CACHE: dict = {}


def get(name):
    if name not in _CACHE:
        _CACHE[name] = MODELS[name]()
    return _CACHE[name]


def _probs(seed, B=1):
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(B, T, T, generator=g).tril()
    return p / p.sum(-1, keepdim=True)


def row_interventions(model) -> list[list]:
    s = headint.integration.structure.model_shape(model)
    D, Dv = s.head_dim, s.v_head_dim
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return [
        [Ablate(layer=0, head=1), PatchPattern(layer=1, head=2, probs=_probs(2))],
        [],
        [PatchQKV(layer=1, head=0, which="v", source=r(1, s.n_kv_heads, T, Dv)), Scale(layer=0, head=[0, 3], factor=0.5, target="scores")],
        [Knockout(queries=[T - 1], keys=[0, 2], layer=1, head=1), PatchQKV(layer=0, head=1, which="k", positions=[1, 2],
                                                                         source=r(1, s.n_kv_heads, T, D)),
         PatchPattern(layer=0, head=0, probs=_probs(3)), PatchPattern(layer=0, head=3, probs=_probs(4))],
        [Patch(layer=1, head=3, source=r(1, T, s.n_heads, Dv)), Steer(layer=0, head=2, vector=r(Dv)), Scale(layer=1, head=3, factor=2.0),
         PatchQKV(layer=0, head=2, which="q", positions=[4], source=r(1, s.n_heads, T, D))],
    ]


@pytest.mark.parametrize("name", list(MODELS))
def test_per_row_plans_lose_no_edit(name):
    """One forward with a different list per row equals each row run alone with its list: the
    stacked plan keeps every edit kind, each filled where a row has none."""
    model = get(name)
    ids = torch.randint(3, 50, (5, T), generator=torch.Generator().manual_seed(7))
    rows = row_interventions(model)
    with torch.no_grad(), headint.intervene(model, rows, backend=BACKEND):
        together = model(input_ids=ids).logits
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    for i, ivs in enumerate(rows):
        with torch.no_grad(), headint.intervene(model, ivs, backend=BACKEND):
            alone = model(input_ids=ids[i : i + 1]).logits
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-5, rtol=1e-5, msg=f"row {i}")
        assert ivs == [] or not torch.allclose(alone, plain[i : i + 1], atol=1e-3), f"row {i}: its interventions matter"


def test_per_row_pattern_edits_match_an_eager_oracle():
    from test_scan_targets import pattern_run  # the pattern oracle: plain eager attention with rows replaced

    model = get("gpt2")
    ids = torch.randint(3, 50, (3, T), generator=torch.Generator().manual_seed(8))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    src = {0: _probs(11), 2: _probs(12)}
    rows = [[PatchPattern(layer=1, head=2, probs=src[0])], [], [PatchPattern(layer=2, head=0, probs=src[2])]]
    with torch.no_grad(), headint.intervene(model, rows, backend=BACKEND):
        got = model(input_ids=ids).logits
    edits = [{(1, 2, None): src[0]}, {}, {(2, 0, None): src[2]}]
    for i in range(3):
        want, _ = pattern_run(model, {k: v[i : i + 1] for k, v in batch.items()}, edits[i])
        torch.testing.assert_close(got[i : i + 1], want, atol=1e-5, rtol=1e-5, msg=f"row {i}")


# ------------------------------------------------------------------------------ MLA value scans


def _mla_oracle(model, batch, method, corrupt=None, positions=(None,)):
    """One forward per (layer, value head, position): the head's value columns of ``kv_b_proj``'s
    output (DeepSeek-V3 expands its latent ``[N, 1, T, r]`` into ``[N, 1, T, H * (qk_nope + v)]``
    there) zeroed, or taken
    from the clean run (patch, denoising: the corrupt run with the clean values)."""
    cfg = model.config
    nope, Dv, H = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.num_attention_heads
    layers = [a.self_attn.kv_b_proj for a in model.model.layers]

    def run(b, edit=None, record=None):
        handles = []
        for l, proj in enumerate(layers):
            def hook(_m, _a, y, l=l):
                if record is not None:
                    record[l] = y.detach().clone()
                if edit is not None and edit[0] == l:  # y [N, 1, T, H * (nope + Dv)]: the latent is one "head"
                    _, h, p, value = edit
                    z = y.clone().view(y.shape[0], y.shape[2], H, nope + Dv)
                    rows = slice(None) if p is None else slice(p, p + 1)
                    z[:, rows, h, nope:] = value[:, rows] if value is not None else 0
                    return z.view(y.shape)
            handles.append(proj.register_forward_hook(hook))
        try:
            with torch.no_grad():
                lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, -1]
        finally:
            for h in handles:
                h.remove()
        return lg.gather(1, b["target"][:, None])[:, 0] - lg.gather(1, b["contrast"][:, None])[:, 0]

    base, source = (corrupt, batch) if method == "patch" else (batch, None)
    clean_kv: dict = {}
    if source is not None:
        run(source, record=clean_kv)
    N = batch["input_ids"].shape[0]
    per_pos = positions != (None,)
    out = torch.full((len(layers), H, T, N) if per_pos else (len(layers), H, N), float("nan"))
    for l in range(len(layers)):
        for h in range(H):
            for p in positions:
                value = None
                if source is not None:
                    value = clean_kv[l].view(N, T, H, nope + Dv)[:, :, h, nope:]
                out[(l, h, p) if per_pos else (l, h)] = run(base, (l, h, p, value))
    return out


@pytest.mark.parametrize("method,per_position", [("zero", False), ("patch", False), ("zero", True)])
def test_mla_value_scans_match_a_hook_oracle(method, per_position):
    """DeepSeek-V3's values have their own head dim (12; queries/keys 24): ``target="v"`` scans
    replace them at that dim (this crashed with 24 vs 12 before)."""
    model = get("deepseek_v3")
    batch = make_batch(3, T, seed=21)
    corrupt = corrupt_of(batch) if method == "patch" else None
    positions = [0, 3, T - 1] if per_position else None
    r = headint.scan(model, batch, "logit_diff", corrupt=corrupt, method=method, target="v", per_position=per_position,
                     positions=positions, group_positions=1, progress=False, backend=BACKEND)
    # per position: rows fed from their position, with the clean run's cache before it (DeepSeek-V3
    # caches its compressed latents, not per-head keys/values)
    assert r.settings["position_reuse"] is per_position
    want = _mla_oracle(model, batch, method, corrupt, tuple(positions) if per_position else (None,))
    got = r.per_example
    scanned = ~torch.isnan(want)
    assert torch.equal(torch.isnan(got), ~scanned)
    torch.testing.assert_close(got[scanned], want[scanned], atol=1e-5, rtol=1e-5)
    assert float((want[scanned] - r.base_per_example.expand_as(want)[scanned]).abs().max()) > 1e-3  # the edits matter


# ------------------------------------------------------------------------------ the description itself


SHAPE = LayerShape(n_heads=4, n_kv_heads=2, head_dim=8, v_head_dim=6)


def test_stack_fills_rows_without_an_edit():
    sizes = axis_sizes(SHAPE, Tq=3, Tk=5)
    sel = torch.zeros(1, 4, 3, dtype=torch.bool)
    sel[0, 1, 2] = True
    probs = torch.rand(1, 4, 3, 5)
    a = CallPlan(pattern_edits=[PatternEdit(sel, probs)], v_edit=Replacement(torch.ones(1, 2, 5, dtype=torch.bool), None))
    b = CallPlan(head_mask=torch.zeros(1, 4, 3), score_scale=torch.full((1, 4), 2.0))
    out = CallPlan.stack([a, None, b], sizes)
    assert out.present() == {"pattern_edits", "v_edit", "head_mask", "score_scale"}
    pe = out.pattern_edits[0]
    assert pe.select.shape == (3, 4, 3) and pe.probs.shape == (3, 4, 3, 5)
    assert torch.equal(pe.select[0], sel[0]) and not pe.select[1:].any() and torch.equal(pe.probs[0], probs[0])
    assert out.v_edit.values is None and out.v_edit.select[0].all() and not out.v_edit.select[1:].any()
    assert torch.equal(out.head_mask[:2], torch.ones(2, 4, 3)) and torch.equal(out.head_mask[2], torch.zeros(4, 3))
    assert torch.equal(out.score_scale, torch.tensor([[1.0] * 4, [1.0] * 4, [2.0] * 4]))
    v = CallPlan.stack([replace_input("v", torch.ones(1, 2, 5, dtype=torch.bool), torch.ones(1, 2, 5, 6)), None], sizes)
    assert v.v_edit.values.shape == (2, 2, 5, 6)  # the value head dim, not the query/key one
    assert CallPlan.stack([None, CallPlan()], sizes) is None
    with pytest.raises(ValueError, match="output: rows without it cannot be stacked"):
        CallPlan.stack([CallPlan(output=torch.zeros(1, 4, 3, 6)), None], sizes)
    with pytest.raises(ValueError, match=r"head_mask: a per-row plan's tensor must broadcast to \[1, hq, tq\]"):
        CallPlan.stack([CallPlan(head_mask=torch.ones(1, 3, 3)), None], sizes)


def test_window_cuts_positions_and_refuses_short_tensors():
    plan = CallPlan(head_mask=torch.arange(8.0).expand(1, 4, 8), pattern_edits=[PatternEdit(torch.ones(1, 4, 8, dtype=torch.bool),
                                                                                           torch.arange(64.0).view(1, 1, 8, 8))])
    w = plan.window(q_start=5, Tq=2, k_start=0, Tk=7)
    assert torch.equal(w.head_mask[0, 0], torch.tensor([5.0, 6.0]))
    assert w.pattern_edits[0].probs.shape == (1, 1, 2, 7) and float(w.pattern_edits[0].probs[0, 0, 0, 0]) == 40.0
    with pytest.raises(ValueError, match=r"TensorPlan layer 3: head_mask covers 8 positions on its tq axis, the call needs queries 7..8"):
        TensorPlan({3: plan}).for_call(3, 1, 2, 9, "cpu", torch.float32, q_start=7)
    with pytest.raises(TypeError, match="layer 0 must be a CallPlan"):
        TensorPlan({0: {"head_mask": torch.ones(1, 4, 1)}})


def test_every_edit_is_reviewed_for_the_shortcuts():
    """The shortcuts take an allow-list: a new edit kind is outside it until someone decides. This
    test makes that decision explicit: it fails when an edit is added without one."""
    names = {f.name for f in EDITS}
    assert PER_POSITION_EDITS == names, "decide whether position reuse and the last-query block understand the new edit"
    assert CLEAN_ATTENTION_EDITS < names
    assert [f.stage for f in EDITS] == sorted((f.stage for f in EDITS), key=("inputs", "operator", "pattern", "output", "after").index)


def test_shortcut_refuses_an_edit_it_does_not_understand(gpt2):
    batch = make_batch(2, 5, seed=31)
    runner = VariantRunner.start(gpt2, batch, headint.metrics.LogitDiff(), backend=BACKEND)
    ex = torch.tensor([0, 1])
    sel = torch.ones(2, 4, 5, dtype=torch.bool)
    plan = TensorPlan({1: CallPlan(head_mask=torch.zeros(2, 4, 1), pattern_edits=[PatternEdit(sel, torch.full((1, 4, 5, 5), 0.2))])})
    with pytest.raises(ValueError, match=r"the clean_attention shortcut does not understand the edits \['pattern_edits'\] at layer 1"):
        runner.run(ex, plan, start_layer=1, shortcuts=Shortcuts(clean_attention=True, last_query=False))
    runner.run(ex, plan, start_layer=1)  # without the shortcut it runs
    with pytest.raises(ValueError, match=r"depth reuse: the plan intervenes at layers \[1\], below start_layer 2"):
        runner.run(ex, plan, start_layer=2)
