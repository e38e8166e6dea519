"""``intervene`` leaves the model exactly as it found it, and refuses bad input clearly.

- attention implementation of the config and of every sub-config restored (normal exit, an
  exception in the body, an invalid intervention, an exception raised during the forward);
- no hooks left behind; outputs identical to the original afterwards;
- errors name the argument, the shape seen and the one expected;
- models that bypass transformers' AttentionInterface are refused with the class name;
- nested blocks restore correctly;
- :func:`headint.record` caches round-trip through safetensors, padding-aware means.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from torch import nn

import headint
from headint import Ablate, Knockout, Patch, PatchQKV, Scale, intervene, record

import tiny_models as tm

B, T = 3, 8
IDS = torch.randint(3, tm.VOCAB, (B, T), generator=torch.Generator().manual_seed(11))


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    with tm.one_thread():
        yield


# ---------------------------------------------------------------------------------------------
# Snapshots of everything intervene could leave behind


def _all_configs(model) -> list:
    seen, stack = {}, [m.config for m in model.modules() if isinstance(getattr(m, "config", None), transformers.PretrainedConfig)]
    while stack:
        c = stack.pop()
        if id(c) not in seen:
            seen[id(c)] = c
            for key in getattr(c, "sub_configs", {}) or {}:
                sub = getattr(c, key, None)
                if isinstance(sub, transformers.PretrainedConfig):
                    stack.append(sub)
    return list(seen.values())


HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_forward_hooks_always_called", "_backward_hooks", "_backward_pre_hooks")


def _foreign(fn) -> bool:
    """transformers' own output-capturing hooks (installed once, for good, by the first call
    with ``output_hidden_states``/``output_attentions``) are not headint's business."""
    return "output_capturing_hook" in getattr(fn, "__qualname__", "") and fn.__module__.startswith("transformers")


def _hooks(model) -> list:
    out = []
    for name, mod in model.named_modules():
        for d in HOOK_DICTS:
            fns = [f for f in (getattr(mod, d, {}) or {}).values() if not _foreign(f)]
            if fns:
                out.append((name, d, len(fns)))
    return out


def snapshot(model) -> dict:
    return {
        "attn": [(id(c), c._attn_implementation, "_attn_implementation_internal" in c.__dict__,
                  c.__dict__.get("_attn_implementation_internal")) for c in _all_configs(model)],
        "hooks": _hooks(model),
        "training": [m.training for m in model.modules()],
    }


def assert_pristine(model, before: dict, ids=IDS, expected_logits=None):
    after = snapshot(model)
    assert after["attn"] == before["attn"]
    assert after["hooks"] == [] == before["hooks"]
    assert after["training"] == before["training"]
    if expected_logits is not None:
        assert torch.equal(tm.logits(model, ids), expected_logits)


@pytest.fixture(params=list(tm.FACTORIES))
def arch(request):
    return request.param, tm.get(request.param)


# ---------------------------------------------------------------------------------------------
# Restoration


def test_restored_after_normal_exit(arch):
    _, tiny = arch
    model = tiny.model
    before, base = snapshot(model), tm.logits(model, IDS)
    with intervene(model, [Ablate(layer=0, head=1), Knockout(queries=[3], keys=[1], layer=1, head=0)], backend="reference") as m:
        assert m is model
        assert all(c._attn_implementation == "headint" for c in _all_configs(model))
        changed = tm.logits(model, IDS)
    assert not torch.equal(changed, base)
    assert_pristine(model, before, expected_logits=base)


def test_restored_when_body_raises(arch):
    _, tiny = arch
    model = tiny.model
    before, base = snapshot(model), tm.logits(model, IDS)
    with pytest.raises(KeyError, match="from the body"):
        with intervene(model, [Scale(layer=1, head=2, factor=0.0)], backend="reference"):
            tm.logits(model, IDS)
            raise KeyError("from the body")
    assert_pristine(model, before, expected_logits=base)


@pytest.mark.parametrize("bad", [
    [Ablate(layer=7)],
    [Ablate(layer=0, head=9)],
    [Ablate(layer=0, kind="median")],
    [Scale(layer=0, target="values")],
    [Ablate(layer=0), "not an intervention"],
    [[Ablate(layer=0)], [Ablate(layer=0, head=-1)]],
], ids=["layer", "head", "kind", "target", "type", "per_row_head"])
def test_invalid_intervention_leaves_model_untouched(arch, bad):
    _, tiny = arch
    model = tiny.model
    before, base = snapshot(model), tm.logits(model, IDS)
    entered = False
    with pytest.raises((ValueError, TypeError)):
        with intervene(model, bad, backend="reference"):
            entered = True
    assert not entered
    assert_pristine(model, before, expected_logits=base)


def test_error_raised_during_forward_propagates_and_restores(arch):
    """A Patch source covering fewer positions than the input only fails at call time."""
    _, tiny = arch
    model = tiny.model
    short = torch.zeros(1, 4, tiny.n_heads, tiny.head_dim)
    before, base = snapshot(model), tm.logits(model, IDS)
    with pytest.raises(ValueError) as err:
        with intervene(model, [Patch(layer=1, head=0, source=short)], backend="reference"):
            tm.logits(model, IDS)
    msg = str(err.value)
    assert "Patch.source" in msg and "[1, 4, 4, 8]" in msg and "7" in msg, msg
    assert_pristine(model, before, expected_logits=base)


def test_per_row_length_mismatch(arch):
    _, tiny = arch
    model = tiny.model
    before, base = snapshot(model), tm.logits(model, IDS)
    with pytest.raises(ValueError, match=r"2 rows.*batch has 3 rows"):
        with intervene(model, [[Ablate(layer=0, head=0)], [Ablate(layer=0, head=1)]], backend="reference"):
            tm.logits(model, IDS)
    assert_pristine(model, before, expected_logits=base)


def _tiny_llava(vision_layers: int = 1):
    torch.manual_seed(0)
    text = transformers.LlamaConfig(vocab_size=tm.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers,
                                           num_attention_heads=4, image_size=8, patch_size=4, projection_dim=32)
    return transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=tm.VOCAB - 1,
                                 vision_feature_layer=-1)).eval()


def test_non_default_implementations_restored_on_subconfigs():
    """A composite model (Llava: text + vision sub-configs) with different implementations per
    sub-config gets each one back."""
    model = _tiny_llava()
    model.set_attn_implementation({"text_config": "eager", "vision_config": "sdpa"})
    impls = lambda: (model.config._attn_implementation, model.config.text_config._attn_implementation,  # noqa: E731
                     model.config.vision_config._attn_implementation)
    assert impls() == ("sdpa", "eager", "sdpa")
    ids = IDS[:, :6] % (tm.VOCAB - 1)
    before, base = snapshot(model), tm.logits(model, ids)
    with intervene(model, [Ablate(layer=1, head=2)], backend="reference"):
        assert impls() == ("headint",) * 3
        assert not torch.equal(tm.logits(model, ids), base)
    assert impls() == ("sdpa", "eager", "sdpa")
    assert_pristine(model, before, ids=ids, expected_logits=base)
    with pytest.raises(RuntimeError):
        with intervene(model, [], backend="reference"):
            raise RuntimeError
    assert impls() == ("sdpa", "eager", "sdpa")


def test_multimodal_text_layer_intervention_leaves_vision_tower_alone():
    model = _tiny_llava(vision_layers=2)
    vision = model.model.vision_tower
    seen = {}
    handle = vision.register_forward_hook(lambda _m, _a, out: seen.__setitem__("v", out.last_hidden_state.clone()))
    ids = torch.tensor([[5, 6] + [tm.VOCAB - 1] * 4 + [7, 8]])
    pixels = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pixels)
            clean = seen["v"]
            with intervene(model, [Ablate(layer=1, head=0)], backend="reference"):
                model(input_ids=ids, pixel_values=pixels)
    finally:
        handle.remove()
    torch.testing.assert_close(seen["v"], clean)


def test_eager_model_restored():
    tiny = tm.make_llama(seed=3)
    tiny.model.set_attn_implementation("eager")
    before, base = snapshot(tiny.model), tm.logits(tiny.model, IDS)
    with intervene(tiny.model, [Ablate(layer=0, head=0)], backend="reference"):
        tm.logits(tiny.model, IDS)
    assert tiny.model.config._attn_implementation == "eager"
    assert_pristine(tiny.model, before, expected_logits=base)


def test_nested_blocks_restore(arch):
    _, tiny = arch
    model = tiny.model
    before, base = snapshot(model), tm.logits(model, IDS)
    outer_ivs = [Ablate(layer=0, head=0)]
    with intervene(model, outer_ivs, backend="reference"):
        outer = tm.logits(model, IDS)
    assert not torch.equal(outer, base)
    with intervene(model, outer_ivs, backend="reference"):
        assert torch.equal(tm.logits(model, IDS), outer)  # (the outer block runs a forward first: see below)
        with intervene(model, [Ablate(layer=1, head=1)], backend="reference"):
            assert model.config._attn_implementation == "headint"
            tm.logits(model, IDS)
        # the outer block is in force again
        assert model.config._attn_implementation == "headint"
        assert torch.equal(tm.logits(model, IDS), outer)
        with pytest.raises(ZeroDivisionError):
            with intervene(model, [Scale(layer=1, head=3, factor=2.0)], backend="reference"):
                tm.logits(model, IDS)
                1 / 0
        assert torch.equal(tm.logits(model, IDS), outer)
        with pytest.raises(ValueError):
            with intervene(model, [Ablate(layer=99)], backend="reference"):
                pass
        assert torch.equal(tm.logits(model, IDS), outer)
    assert_pristine(model, before, expected_logits=base)


def test_nested_block_forward_before_outer_forward():
    tiny = tm.get("gpt2")
    before, base = snapshot(tiny.model), tm.logits(tiny.model, IDS)
    try:
        with intervene(tiny.model, [Ablate(layer=0, head=0)], backend="reference"):
            with intervene(tiny.model, [Ablate(layer=1, head=1)], backend="reference"):
                tm.logits(tiny.model, IDS)  # raises UnsupportedModelError
            record(tiny.model, IDS)  # the same through record() inside an intervene block
    finally:
        assert_pristine(tiny.model, before, expected_logits=base)


def test_nested_blocks_on_two_models():
    a, b = tm.get("gpt2"), tm.get("llama")
    base_a, base_b = tm.logits(a.model, IDS), tm.logits(b.model, IDS)
    snap_a, snap_b = snapshot(a.model), snapshot(b.model)
    with intervene(a.model, [Ablate(layer=0, head=2)], backend="reference"):
        ablated_a = tm.logits(a.model, IDS)
        cache = record(b.model, IDS, what=("z",), backend="reference")  # a second model inside
        assert torch.equal(tm.logits(b.model, IDS), base_b)  # restored already
        assert torch.equal(tm.logits(a.model, IDS), ablated_a)  # the outer still applies
        with intervene(b.model, [Patch(layer=1, head=0, source=cache)], backend="reference"):
            torch.testing.assert_close(tm.logits(b.model, IDS), base_b, atol=2e-5, rtol=1e-5)  # self-patch: no change
            assert torch.equal(tm.logits(a.model, IDS), ablated_a)
    assert not torch.equal(ablated_a, base_a)
    assert_pristine(a.model, snap_a, expected_logits=base_a)
    assert_pristine(b.model, snap_b, expected_logits=base_b)


def test_record_restores(arch):
    _, tiny = arch
    before, base = snapshot(tiny.model), tm.logits(tiny.model, IDS)
    record(tiny.model, IDS, what=("z", "q", "k", "v", "pattern"), interventions=[Ablate(layer=0, head=1)], backend="reference")
    assert_pristine(tiny.model, before, expected_logits=base)


# ---------------------------------------------------------------------------------------------
# Error messages: the argument, the shape seen, the shape expected


def _error(model, ivs, ids=IDS):
    with pytest.raises((ValueError, TypeError, KeyError)) as err:
        with intervene(model, ivs, backend="reference"):
            tm.logits(model, ids)
    return err.type, str(err.value)


def _expect(model, ivs, exc, *parts):
    before = snapshot(model)
    etype, msg = _error(model, ivs)
    assert issubclass(etype, exc), (etype, msg)
    for p in parts:
        assert re.search(p, msg), f"{p!r} not in {msg!r}"
    assert_pristine(model, before)


def test_error_layer_out_of_range():
    m = tm.get("llama").model
    _expect(m, [Ablate(layer=2, head=0)], ValueError, r"Ablate", r"layer 2", r"2 layers", r"0\.\.1")
    _expect(m, [Knockout(queries=[1], keys=[0], layer=-1, head=0)], ValueError, r"Knockout", r"layer -1", r"2 layers")
    _expect(m, [PatchQKV(layer=5, head=0, which="v", source=torch.zeros(1, 2, T, 8))], ValueError, r"PatchQKV", r"layer 5")
    _expect(m, [Ablate(layer=1.0, head=0)], TypeError, r"layer", r"1\.0")


def test_error_head_out_of_range():
    m = tm.get("llama").model
    _expect(m, [Ablate(layer=0, head=4)], ValueError, r"head 4", r"layer 0", r"4 query heads", r"0\.\.3")
    _expect(m, [Scale(layer=1, head=[0, 7], factor=0.5)], ValueError, r"head 7", r"4 query heads")
    _expect(m, [Knockout(queries=[1], keys=[0], layer=0, head=-1)], ValueError, r"head -1")
    _expect(m, [Ablate(layer=0, head=True)], TypeError, r"head", r"True")


def test_error_kv_head_out_of_range_under_gqa():
    tiny = tm.get("llama")
    assert tiny.n_kv_heads == 2 < tiny.n_heads
    cache = record(tiny.model, IDS, what=("q", "k", "v"), backend="reference")
    for which in ("k", "v"):
        _expect(tiny.model, [PatchQKV(layer=0, head=2, which=which, source=cache)], ValueError,
                r"key/value head 2", r"2 key/value heads", r"0\.\.1")
    # the same index is a valid query head
    with intervene(tiny.model, [PatchQKV(layer=0, head=3, which="q", source=cache)], backend="reference"):
        assert torch.isfinite(tm.logits(tiny.model, IDS)).all()


def test_error_patch_qkv_source_shape():
    tiny = tm.get("llama")
    bad = torch.zeros(B, 4, T, 8)  # query-head count given for a key/value patch
    _expect(tiny.model, [PatchQKV(layer=0, head=0, which="v", source=bad)], ValueError,
            r"PatchQKV\(which='v'\)\.source", re.escape("[3, 4, 8, 8]"), re.escape("[B, 2, T, 8]"))
    _expect(tiny.model, [PatchQKV(layer=0, head=0, which="k", source=torch.zeros(B, 2, 4, 8))], ValueError,
            r"PatchQKV\.source", r"4 positions", r"up to 7")
    _expect(tiny.model, [PatchQKV(layer=0, head=0, which="x", source=bad)], ValueError, r"PatchQKV\.which", r"'x'")
    _expect(tiny.model, [PatchQKV(layer=0, head=0, which="v")], ValueError, r"source")


def test_error_patch_qkv_short_source_reports_shape_as_given():
    tiny = tm.get("llama")
    _expect(tiny.model, [PatchQKV(layer=0, head=0, which="k", source=torch.zeros(B, 2, 4, 8))], ValueError,
            r"PatchQKV\.source", re.escape("[3, 2, 4, 8]"))


def test_error_mean_value_shape():
    m = tm.get("gpt2").model
    _expect(m, [Ablate(layer=0, head=0, kind="mean", value=torch.zeros(T, 4, 7))], ValueError,
            r"Ablate", r"mean value", r"layer 0", re.escape("[8, 4, 7]"), re.escape("[T, H, D]"), r"4, 8\]")
    _expect(m, [Ablate(layer=0, head=0, kind="mean", value=torch.zeros(4, 7))], ValueError,
            r"Ablate", r"mean value", re.escape("[H, D]"), r"4, 8\]")
    _expect(m, [Ablate(layer=1, head=0, kind="mean", value=torch.zeros(1, T, 4, 8))], ValueError,
            r"Ablate", r"layer 1", re.escape("[1, 8, 4, 8]"), re.escape("[H, D]"), re.escape("[T, H, D]"))
    _expect(m, [Ablate(layer=0, head=0, kind="mean")], TypeError, r"Ablate\(kind='mean'\)", r"value=")


def test_error_mean_value_shape_reports_shape_as_given():
    m = tm.get("gpt2").model
    _expect(m, [Ablate(layer=0, head=0, kind="mean", value=torch.zeros(4, 7))], ValueError, r"shape \[4, 7\]")


def test_error_mean_value_too_short_at_call_time():
    tiny = tm.get("gpt2")
    _expect(tiny.model, [Ablate(layer=0, head=0, kind="mean", value=torch.zeros(5, 4, 8))], ValueError,
            r"Ablate mean value", re.escape("[5, 4, 8]"), r"up to 7")


def test_error_patch_source_shape():
    tiny = tm.get("qwen2")
    _expect(tiny.model, [Patch(layer=0, head=0, source=torch.zeros(B, T, 4, 7))], ValueError,
            r"Patch\.source", r"layer 0", re.escape("[3, 8, 4, 7]"), re.escape("[B, T, 4, 8]"))
    _expect(tiny.model, [Patch(layer=1, head=0, source=torch.zeros(T, 4, 8))], ValueError,
            r"Patch\.source", re.escape("[8, 4, 8]"), re.escape("[B, T, 4, 8]"))
    _expect(tiny.model, [Patch(layer=1, head=0)], TypeError, r"Patch\.source", r"NoneType")
    cache = record(tiny.model, IDS, what=("v",), backend="reference")
    _expect(tiny.model, [Patch(layer=1, head=0, source=cache)], KeyError, r"'z'", r"layer 1")


@pytest.mark.parametrize("per_row", [False, True], ids=["shared", "per_row"])
def test_error_patch_source_batch_mismatch(per_row):
    """The docs: the source's batch must be 1 or the model's batch."""
    tiny = tm.get("qwen2")
    iv = Patch(layer=0, head=0, source=torch.zeros(2, T, 4, 8))
    _expect(tiny.model, [[iv]] * B if per_row else [iv], ValueError, r"Patch\.source", re.escape("[2, 8, 4, 8]"), r"3")


def test_error_per_row_list_length():
    m = tm.get("bert").model
    _expect(m, [[Ablate(layer=0, head=0)]] * 2, ValueError, r"per-row", r"2 rows", r"3 rows")
    _expect(m, [[Ablate(layer=0, head=0)]] * 5, ValueError, r"per-row", r"5 rows", r"3 rows")


def test_error_unknown_kinds():
    m = tm.get("mistral").model
    _expect(m, [Ablate(layer=0, head=0, kind="resample")], ValueError, r"Ablate\.kind", r"'resample'", r"'zero'", r"'mean'")
    _expect(m, [Scale(layer=0, head=0, target="values")], ValueError, r"Scale\.target", r"'values'")
    _expect(m, [PatchQKV(layer=0, head=0, which="o", source=torch.zeros(1, 2, T, 8))], ValueError, r"which", r"'o'")
    _expect(m, [Ablate(layer=0), {"layer": 0}], TypeError, r"interventions must be", r"dict")
    _expect(m, [Scale(layer=0, head=0, positions=[1], target="scores")], ValueError, r"positions must be None")
    _expect(m, [Ablate(layer=0, head=0, positions=[-2])], ValueError, r"positions", r"-2")
    with pytest.raises(TypeError, match="interventions must be"):
        with intervene(m, 3):
            pass


# ---------------------------------------------------------------------------------------------
# Models that bypass the registry


def test_unsupported_transformers_model_named():
    assert not getattr(transformers.BloomForCausalLM, "_supports_attention_backend", False)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=tm.VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()
    before, base = snapshot(model), tm.logits(model, IDS)
    with pytest.raises(headint.UnsupportedModelError, match="BloomForCausalLM"):
        with intervene(model, [Ablate(layer=0, head=0)]):
            pass
    with pytest.raises(headint.UnsupportedModelError, match="BloomForCausalLM"):
        record(model, IDS)
    assert_pristine(model, before, expected_logits=base)
    assert issubclass(headint.UnsupportedModelError, TypeError)


def test_not_a_transformers_model():
    with pytest.raises(headint.UnsupportedModelError, match="Linear"):
        with intervene(nn.Linear(4, 4), []):
            pass


class _BypassConfig(transformers.PretrainedConfig):
    model_type = "headint_test_bypass"

    def __init__(self, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, **kwargs):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        super().__init__(**kwargs)


class _ClaimsSupportButBypasses(transformers.PreTrainedModel):
    """Says it uses the attention backend, yet computes everything itself."""

    config_class = _BypassConfig
    _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(config)
        self.proj = nn.Linear(8, 8)
        self.post_init()

    def forward(self, x):
        return self.proj(x)


class _NoSupportFlag(_ClaimsSupportButBypasses):
    _supports_attention_backend = False


def test_custom_model_that_bypasses_registry():
    model = _ClaimsSupportButBypasses(_BypassConfig()).eval()
    before = snapshot(model)
    x = torch.randn(2, 8)
    with torch.no_grad():
        base = model(x)
    with pytest.raises(headint.UnsupportedModelError, match="_ClaimsSupportButBypasses"):
        with intervene(model, []):
            with torch.no_grad():
                model(x)
    after = snapshot(model)
    assert after["attn"] == before["attn"] and after["hooks"] == []
    with torch.no_grad():
        assert torch.equal(model(x), base)
    with pytest.raises(headint.UnsupportedModelError, match="_NoSupportFlag"):
        with intervene(_NoSupportFlag(_BypassConfig()), []):
            pass


# ---------------------------------------------------------------------------------------------
# record: save/load round trip and padding-aware means


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_record_save_load_round_trip(tmp_path, name):
    tiny = tm.get(name)
    mask = torch.ones(B, T, dtype=torch.long)
    if tm.is_decoder(name):
        mask[1, :3] = 0
        mask[2, :5] = 0
    else:
        mask[1, 5:] = 0
        mask[2, 3:] = 0
    ids = torch.where(mask.bool(), IDS, torch.zeros_like(IDS))
    what = ("z", "q", "k", "v", "pattern")
    cache = record(tiny.model, {"input_ids": ids, "attention_mask": mask}, what=what, backend="reference")
    assert torch.equal(cache.attention_mask, mask)
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    loaded = headint.ActivationCache.load(path)
    assert set(loaded.tensors) == set(cache.tensors) == {(w, l) for w in what for l in range(tm.N_LAYERS)}
    for key, t in cache.tensors.items():
        assert loaded.tensors[key].dtype == t.dtype
        assert torch.equal(loaded.tensors[key], t), key
    assert torch.equal(loaded.attention_mask, mask)
    assert loaded.meta == cache.meta
    assert loaded.layers() == [0, 1]
    # means skip padding: per position over the rows where it is real; overall over real tokens
    for l in range(tm.N_LAYERS):
        z = cache["z", l]
        per_pos = torch.zeros(T, tiny.n_heads, tiny.head_dim)
        for t in range(T):
            rows = [b for b in range(B) if mask[b, t]]
            per_pos[t] = z[rows, t].mean(0)
        real = torch.stack([z[b, t] for b in range(B) for t in range(T) if mask[b, t]])
        for c in (cache, loaded):
            torch.testing.assert_close(c.mean_z(l), per_pos, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(c.mean_z(l, over_positions=True), real.mean(0), atol=1e-6, rtol=1e-6)
        # the padded positions really differ from the real ones (so exclusion matters)
        assert not torch.allclose(c.mean_z(l), z.mean(0), atol=1e-4)
    # a loaded cache works as a Patch / mean source exactly like the original
    ivs = lambda c: [Patch(layer=1, head=2, source=c), Ablate(layer=0, head=1, kind="mean", value=c)]  # noqa: E731
    with intervene(tiny.model, ivs(cache), backend="reference"):
        a = tm.logits(tiny.model, ids, mask)
    with intervene(tiny.model, ivs(loaded), backend="reference"):
        b = tm.logits(tiny.model, ids, mask)
    assert torch.equal(a, b)


def test_record_round_trip_without_mask(tmp_path):
    tiny = tm.get("gpt2")
    cache = record(tiny.model, IDS, what=("z", "v"), backend="reference")
    assert cache.attention_mask is None
    cache.save(tmp_path / "c.safetensors")
    loaded = headint.ActivationCache.load(tmp_path / "c.safetensors")
    assert loaded.attention_mask is None
    assert loaded.meta == {"what": ["z", "v"]}
    for key in cache.tensors:
        assert torch.equal(loaded.tensors[key], cache.tensors[key])
    torch.testing.assert_close(loaded.mean_z(0), cache["z", 0].mean(0))
    with pytest.raises(KeyError, match="'q'"):
        loaded.get("q", 0)


def test_record_rejects_unknown_activation():
    tiny = tm.get("gpt2")
    before = snapshot(tiny.model)
    with pytest.raises(ValueError, match="'attn'"):
        record(tiny.model, IDS, what=("z", "attn"))
    assert_pristine(tiny.model, before)
