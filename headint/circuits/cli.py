"""``headint circuit``: edge scores and a circuit from the command line.

``headint circuit MODEL --prompts P.jsonl --corrupt C.jsonl --method eap-ig --out DIR`` scores every
edge of the model (``MODEL``: a local ``transformers`` causal-LM checkpoint, or the name of a
shipped model such as ``induction-2l``), extracts a circuit (``--top`` edges or ``--threshold``,
connected to the logits) and writes ``edges.csv`` (the tidy edge table), ``circuit.json`` +
``circuit.safetensors`` (the result, loadable with :meth:`CircuitResult.load`), ``circuit.svg``
and ``circuit.html``. ``--method acdc`` runs ACDC with ``--threshold`` instead. A mistake is one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..vocabulary import METRIC_NAMES

METHODS = ("eap", "eap-ig", "eap-ig-activations", "patch", "acdc")


def add_parser(sub) -> None:
    """Register the ``circuit`` subcommand on ``headint``'s subparsers."""
    c = sub.add_parser(
        "circuit",
        help="score every edge (EAP, EAP-IG, exact patching) or run ACDC, and write the circuit",
        description="Edge-level circuit discovery on a local causal-LM checkpoint or a shipped model: scores for every "
        "edge between the input embedding, attention heads (their q/k/v inputs separately), MLPs and the logits; "
        "writes edges.csv, circuit.json/.safetensors, circuit.svg and circuit.html.",
    )
    c.add_argument("model", help="a local transformers causal-LM checkpoint directory, or a shipped model name (e.g. induction-2l)")
    c.add_argument("--prompts", required=True, help="JSONL prompts (as for 'headint scan')")
    c.add_argument("--corrupt", required=True, help="JSONL corrupt prompts, line-aligned, same token counts")
    c.add_argument("--metric", default="logit_diff", choices=METRIC_NAMES, help="(default: logit_diff)")
    c.add_argument("--method", default="eap-ig", choices=METHODS, help="eap, eap-ig (on the inputs), eap-ig-activations, "
                   "patch (exact, each edge alone), acdc (default: eap-ig)")
    c.add_argument("--steps", type=int, default=5, help="interpolation steps of EAP-IG (default: 5)")
    c.add_argument("--top", type=int, default=None, help="circuit: the top-n edges by |score| (default 20, unless --threshold)")
    c.add_argument("--threshold", type=float, default=None, help="circuit: edges with |score| >= this; for acdc its threshold")
    c.add_argument("--batch-size", type=int, default=16, help="examples per forward (default: 16)")
    c.add_argument("--out", required=True, help="output directory (created)")


def _fail(msg: str) -> int:
    print("headint circuit: " + " ".join(str(msg).split()), file=sys.stderr)
    return 2


def run(args, cli) -> int:
    """Run ``headint circuit``; ``cli`` is :mod:`headint.cli` (its prompt loading, checks and model
    loading, passed in so that this module does not import it back)."""
    UsageError, find_tokenizer, load_causal_lm, read_prompts = (
        cli.UsageError, cli.find_tokenizer, cli.load_causal_lm, cli.read_prompts)
    created: list[Path] = []
    try:
        if args.steps < 1 or args.batch_size < 1:
            raise UsageError("--steps and --batch-size must be positive integers")
        if args.top is not None and args.threshold is not None and args.method != "acdc":
            raise UsageError("give --top or --threshold, not both")
        if args.method == "acdc" and args.threshold is None:
            raise UsageError("--method acdc needs --threshold (the criterion's change below which an edge is removed)")
        if args.top is not None and args.top < 1:
            raise UsageError(f"--top must be a positive integer, got {args.top}")
        out = Path(args.out)
        cli.check_out(out)
        from .. import models

        if args.model in models.available():
            model_dir = models.model_dir(args.model)
        else:
            model_dir = Path(args.model)
            cli.check_model_dir(model_dir)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        tokenizer = find_tokenizer(model_dir)
        ns = argparse.Namespace(prompts=args.prompts, corrupt=args.corrupt, metric=args.metric, method="patch")
        clean, corrupt = read_prompts(ns, model_dir, tokenizer, config)
        created = cli.prepare_out(out)  # created and probed before the model loads
    except UsageError as e:
        cli.remove_empty(created)
        return _fail(str(e))
    from .. import circuits, models

    model = models.load(args.model) if args.model in models.available() else load_causal_lm(model_dir, True)
    try:
        if args.method in ("eap", "eap-ig", "eap-ig-activations"):
            res = circuits.attribute(model, clean, corrupt, args.metric, method=args.method, steps=args.steps, batch_size=args.batch_size)
        elif args.method == "patch":
            res = circuits.edge_patching(model, clean, args.metric, corrupt=corrupt, batch_size=args.batch_size * 8)
        else:
            res = circuits.acdc(model, clean, corrupt, threshold=args.threshold,
                                criterion="kl" if args.metric == "kl" else args.metric, batch_size=args.batch_size * 8)
        if args.method != "acdc":
            res = res.circuit(top_n=args.top or (None if args.threshold is not None else min(20, res.graph.n_edges)),
                              threshold=args.threshold)
    except (ValueError, TypeError) as e:
        cli.remove_empty(created)
        return _fail(str(e))
    except BaseException:
        cli.remove_empty(created)
        raise
    res.to_csv(out / "edges.csv")
    res.save(out / "circuit")
    res.plot(out / "circuit.svg")
    res.to_html(out / "circuit.html")
    print(res.top(10)[["rank", "edge", "score", "stderr", "in_circuit"]].to_string(index=False))
    print(f"\n{int(res.in_circuit.sum())} edges in the circuit; wrote {out}/edges.csv, circuit.json, circuit.safetensors, "
          "circuit.svg, circuit.html")
    return 0
