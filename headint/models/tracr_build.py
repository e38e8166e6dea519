"""Build the shipped tracr models: ``python -m headint.models.tracr_build [--out DIR]``.

Needs the optional extra ``tracr`` (``pip install -e ".[tracr]"``: tracr-pypi, jax, dm-haiku;
this is the only module that imports them). Compiles tracr's standard-library programs

- ``tracr-reverse``: ``lib.make_reverse(tokens)`` over the vocabulary {1, 2, 3}, at most 5
  tokens after BOS (4 layers, 1 head);
- ``tracr-xproportion``: ``lib.make_frac_prevs(tokens == "x")`` over {w, x, y, z}, at most 5
  tokens (2 layers, 1 head; a numerical output: the fraction of x so far),

converts each to :class:`headint.models.tracr_model.TracrForCausalLM` (same weights, no layer
norm, ``lm_head`` = the projection onto the output space), checks that the converted model's
residual stream and outputs equal tracr's on every input of the maximal length, and writes
``config.json``, ``model.safetensors`` and ``ground_truth.json`` to ``DIR/<name>/`` (default:
this package's folder).

Ground truth (``ground_truth.json``), for resample ablation as Miller et al. (COLM 2024,
"Transformer Circuit Faithfulness Metrics Are Not Robust") define it: prompts of the maximal
length, corrupted by another prompt of the same length. The program parts that read only the
length and the positions (``length``, ``opp_idx``, the selectors' queries and keys) compute the
same values on clean and corrupt prompts, so their edges carry no difference; the true edges
are those on the path of the token values: for reverse ``input -> a3.h0<v>`` and ``a3.h0 ->
logits``; for xproportion ``input -> m0``, ``m0 -> a1.h0<v>`` and ``a1.h0 -> logits``.
The tests check this definition by exact patching (each true edge changes the outputs;
patching every other edge at once changes nothing).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

PROGRAMS = {
    "tracr-reverse": dict(vocab=[1, 2, 3], max_seq_len=5, truth=["input->a3.h0<v>", "a3.h0->logits"]),
    "tracr-xproportion": dict(vocab=["w", "x", "y", "z"], max_seq_len=5, truth=["input->m0", "m0->a1.h0<v>", "a1.h0->logits"]),
}
BOS = "BOS"


def _compile(name):
    from tracr.compiler import compiling, lib
    from tracr.rasp import rasp

    spec = PROGRAMS[name]
    program = lib.make_reverse(rasp.tokens) if name == "tracr-reverse" else lib.make_frac_prevs(rasp.tokens == "x")
    model = compiling.compile_rasp_to_model(program, vocab=set(spec["vocab"]), max_seq_len=spec["max_seq_len"], compiler_bos=BOS)
    return program, model


def convert(name):
    """``(TracrForCausalLM, tracr model, program label)``: the converted model and its source."""
    from headint.models.tracr_model import TracrConfig, TracrForCausalLM

    program, tm = _compile(name)
    cfg, p = tm.model_config, tm.params
    d = p["token_embed"]["embeddings"].shape[1]
    H, D = cfg.num_heads, cfg.key_size
    labels = [str(x) for x in tm.residual_labels]
    out_label = program.label
    categorical = tm.output_encoder is not None and hasattr(tm.output_encoder, "encoding_map")
    if categorical:
        out_map = {str(k): int(v) for k, v in tm.output_encoder.encoding_map.items()}
        n_out = len(out_map)
    else:
        out_map, n_out = {}, 1
    in_map = {str(k): int(v) for k, v in tm.input_encoder.encoding_map.items()}
    config = TracrConfig(vocab_size=p["token_embed"]["embeddings"].shape[0], n_outputs=n_out, hidden_size=d,
                         num_hidden_layers=cfg.num_layers, num_attention_heads=H, head_dim=D,
                         intermediate_size=cfg.mlp_hidden_size, max_position_embeddings=p["pos_embed"]["embeddings"].shape[0],
                         attention_scale=float(1 / np.sqrt(D)), input_encoding=in_map, output_encoding=out_map,
                         output_kind="categorical" if categorical else "numerical", program=name,
                         residual_labels=labels)
    model = TracrForCausalLM(config).eval()
    t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(t(p["token_embed"]["embeddings"]))
        model.model.embed_positions.weight.copy_(t(p["pos_embed"]["embeddings"]))
        for l, block in enumerate(model.model.layers):
            pre = f"transformer/layer_{l}"
            for ours, theirs in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"), ("o_proj", "linear")):
                lin = getattr(block.self_attn, ours)
                lin.weight.copy_(t(p[f"{pre}/attn/{theirs}"]["w"]).t())
                lin.bias.copy_(t(p[f"{pre}/attn/{theirs}"]["b"]))
            block.mlp.fc_in.weight.copy_(t(p[f"{pre}/mlp/linear_1"]["w"]).t())
            block.mlp.fc_in.bias.copy_(t(p[f"{pre}/mlp/linear_1"]["b"]))
            block.mlp.fc_out.weight.copy_(t(p[f"{pre}/mlp/linear_2"]["w"]).t())
            block.mlp.fc_out.bias.copy_(t(p[f"{pre}/mlp/linear_2"]["b"]))
        W = torch.zeros(n_out, d)
        if categorical:
            for value, i in out_map.items():
                W[i, labels.index(f"{out_label}:{value}")] = 1.0
        else:
            W[0, labels.index(out_label)] = 1.0
        model.lm_head.weight.copy_(W)
    return model, tm, out_label


def check(name, model, tm) -> int:
    """Compare with tracr on every input of the maximal length; returns the number of inputs."""
    import itertools

    spec = PROGRAMS[name]
    n = 0
    for seq in itertools.product(spec["vocab"], repeat=spec["max_seq_len"]):
        out = tm.apply([BOS, *seq])
        ids = torch.tensor([[model.config.input_encoding[str(x)] for x in [BOS, *seq]]])
        with torch.no_grad():
            logits = model(ids).logits[0]
            resid = model.model(ids)[0]
        ref = torch.tensor(np.asarray(out.residuals[-1])[0], dtype=torch.float32)
        if not torch.allclose(resid, ref, atol=1e-4):
            raise AssertionError(f"{name}: residual stream differs from tracr's on {seq}: {(resid - ref).abs().max()}")
        if model.config.output_kind == "categorical":
            got = [list(model.config.output_encoding)[i] for i in logits[1:].argmax(-1).tolist()]
            want = [str(x) for x in out.decoded[1:]]
        else:
            got, want = logits[1:, 0].tolist(), [float(x) for x in out.decoded[1:]]
            if not np.allclose(got, want, atol=1e-4):
                raise AssertionError(f"{name}: outputs differ on {seq}: {got} vs {want}")
            n += 1
            continue
        if got != want:
            raise AssertionError(f"{name}: outputs differ on {seq}: {got} vs {want}")
        n += 1
    return n


def build(out_dir: Path) -> None:
    import importlib.metadata as md

    for name, spec in PROGRAMS.items():
        model, tm, label = convert(name)
        n = check(name, model, tm)
        target = out_dir / name
        target.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(target)
        truth = {
            "model": name,
            "program": "lib.make_reverse(rasp.tokens)" if name == "tracr-reverse" else 'lib.make_frac_prevs(rasp.tokens == "x")',
            "vocab": [str(v) for v in spec["vocab"]],
            "max_seq_len": spec["max_seq_len"],
            "bos": BOS,
            "output_sop": label,
            "ablation": "resample (corrupt prompt: another prompt of the same length)",
            "definition": "Miller et al. (COLM 2024): edges whose values differ between a clean prompt and a resampled "
                          "prompt of the same length; the length/position computations carry no difference",
            "edges": spec["truth"],
            "checked_inputs": n,
            "built_with": {k: md.version(k) for k in ("tracr-pypi", "jax", "jaxlib", "dm-haiku", "numpy")},
        }
        (target / "ground_truth.json").write_text(json.dumps(truth, indent=1) + "\n")
        print(f"{name}: {model.config.num_hidden_layers} layers, d_model {model.config.hidden_size}, checked on {n} inputs -> {target}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for the model folders")
    args = ap.parse_args(argv)
    build(Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
