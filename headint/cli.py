"""``headint`` command line: ``headint scan`` and ``headint demo``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

METRIC_CHOICES = ("logit_diff", "logprob", "prob", "kl", "loss")
METHOD_CHOICES = ("zero", "mean", "resample", "patch", "attribution", "attribution-mask")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="headint",
        description="Causal scans of attention heads with interventions inside the attention kernels.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "scan",
        help="scan every head of a local transformers checkpoint on a prompt file",
        description="Replace each attention head's output (or estimate it by attribution) and measure a metric "
        "on every prompt; writes scan.csv (layer, head, [position,] value, stderr), heatmap.png and settings.json.",
    )
    s.add_argument("model_dir", help="a local transformers checkpoint directory (config.json + weights; a tokenizer if prompts are text)")
    s.add_argument("--prompts", required=True, help="JSONL: one example per line, {'text': ...} or {'input_ids': [...]}, with 'target'/'contrast' (ids, or strings of exactly one token) for the metrics that need them")
    s.add_argument("--corrupt", help="JSONL of corrupted prompts, line-aligned with --prompts (needed by --method patch/attribution, and for normalised results)")
    s.add_argument("--metric", default="logit_diff", choices=METRIC_CHOICES, help="logit_diff: logit[target]-logit[contrast] at the last token; logprob/prob: of the target; kl: KL(clean || patched) of the next-token distribution; loss: mean next-token cross-entropy (default: logit_diff)")
    s.add_argument("--method", default="zero", choices=METHOD_CHOICES, help="zero/mean/resample ablation, patch (activation patching from --corrupt), attribution (first-order estimate of patch), attribution-mask (gradient head importance) (default: zero)")
    s.add_argument("--direction", default="denoising", choices=("denoising", "noising"), help="for patch: denoising runs the corrupt prompts with clean head outputs patched in, noising the reverse (default: denoising)")
    s.add_argument("--per-position", action="store_true", help="one intervention per head and position instead of per head")
    s.add_argument("--pairs", action="store_true", help="scan all pairs of heads (finds heads that back each other up)")
    s.add_argument("--layers", type=_int_list, help="comma-separated layers to scan (default: all)")
    s.add_argument("--heads", type=_int_list, help="comma-separated heads to scan (default: all)")
    s.add_argument("--normalize", action="store_true", help="report (value - corrupt) / (clean - corrupt): 0 = corrupted, 1 = clean (needs --corrupt)")
    s.add_argument("--batch-size", default="auto", help="rows (intervention x prompt) per forward pass, or 'auto' (default)")
    s.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cpu"), help="attention backend (default: auto)")
    s.add_argument("--checkpoint", help="folder to save progress to (one file per finished chunk, a subfolder per scan); re-running the same command resumes from it")
    s.add_argument("--top", type=int, default=10, help="print the top-k heads (default: 10)")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bars (scan and weight loading)")
    s.add_argument("--out", required=True, help="output directory (created)")

    d = sub.add_parser(
        "demo",
        help="find the induction circuit of the embedded model (the main job)",
        description="Scan the embedded 2-layer model (induction-2l): exact ablation of every head, attribution, "
        "and a pairwise scan; prints the top heads with their pattern scores and writes heatmaps and CSVs.",
    )
    d.add_argument("--out", default="headint-demo", help="output directory (default: ./headint-demo)")
    d.add_argument("--examples", type=int, default=64, help="number of prompts (default: 64)")
    d.add_argument("--seed", type=int, default=0, help="seed of the prompts (default: 0)")
    d.add_argument("--backend", default="auto", choices=("auto", "reference", "triton", "cpu"))
    return p


def _fail(message: str) -> int:
    """Print ``headint scan: <message>`` as one line on stderr; the exit code of a usage error (2)."""
    print("headint scan: " + " ".join(message.split()), file=sys.stderr)
    return 2


def run_scan(args) -> int:
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from . import attribution_scan, scan
    from .integration.structure import model_shape
    from .prompts import load_prompts
    from .scans import all_pairs
    from .scans.checkpoint import CheckpointError

    model_dir = Path(args.model_dir)
    if not (model_dir / "config.json").exists():
        return _fail(f"{model_dir} is not a transformers checkpoint (no config.json)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception:
        tokenizer = None
    # The prompts are read (and refused) before the model is loaded or run.
    try:
        clean = load_prompts(args.prompts, tokenizer)
        corrupt = load_prompts(args.corrupt, tokenizer) if args.corrupt else None
    except (ValueError, TypeError, OSError) as e:
        return _fail(str(e))
    if corrupt is not None:
        for key in ("target", "contrast"):
            if key in clean and key not in corrupt:
                corrupt[key] = clean[key]
    try:
        batch_size = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    except ValueError:
        return _fail(f"--batch-size must be a positive integer or 'auto', got {args.batch_size!r}")
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if args.no_progress:
        hf_logging.disable_progress_bar()  # the weight-loading bar too
    try:
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir)
        except ValueError:
            model = AutoModel.from_pretrained(model_dir)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    try:
        if args.method.startswith("attribution"):
            result = attribution_scan(model, clean, corrupt, args.metric, method="mask" if args.method == "attribution-mask" else "patch",
                                      direction="noising" if args.direction == "noising" else "denoising",
                                      per_position=args.per_position, backend=args.backend)
        else:
            head_sets = all_pairs(model_shape(model), args.layers, args.heads) if args.pairs else None
            result = scan(model, clean, args.metric, corrupt=corrupt, method=args.method, direction=args.direction,
                          per_position=args.per_position, layers=args.layers, heads=args.heads, head_sets=head_sets,
                          batch_size=batch_size, progress=not args.no_progress, checkpoint=args.checkpoint, backend=args.backend)
    except (ValueError, CheckpointError) as e:
        return _fail(str(e))
    if args.normalize:
        result = result.normalized_result()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.to_csv(out / "scan.csv")
    result.heatmap(out / "heatmap.png", title=f"{args.method} scan of {model_dir.name} ({args.metric})")
    settings = dict(result.settings, model_dir=str(model_dir), prompts=args.prompts, corrupt=args.corrupt,
                    clean_baseline=result.clean_baseline, corrupt_baseline=result.corrupt_baseline, normalized=args.normalize)
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    print(result.top(args.top).to_string(index=False))
    print(f"\nwrote {out / 'scan.csv'}, {out / 'heatmap.png'}, {out / 'settings.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "scan":
        return run_scan(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(out=args.out, n_examples=args.examples, seed=args.seed, backend=args.backend)
    return 2


if __name__ == "__main__":
    sys.exit(main())
