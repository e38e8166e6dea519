"""``headint`` command line: ``headint scan`` and ``headint demo``.

A user's mistake never ends in a traceback: it is one line on stderr, ``headint scan: <what
is wrong>``, and exit code 2. Everything that can be checked without the model's weights
(options and their combinations, the checkpoint's config, the tokenizer, the prompt files,
the output folder) is checked before the model is loaded; that the weights make a causal LM
(no weight initialised randomly) is checked right after loading, before anything runs. An
option that does not apply to the chosen method is an error, never silently ignored.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import sys
from pathlib import Path

from .metrics import as_metric
from .ops.backends import backend_names
from .vocabulary import ATTRIBUTION_METHODS, DIRECTIONS, METHODS, METRIC_NAMES

METRIC_CHOICES = METRIC_NAMES
# --method attribution / attribution-mask: attribution_scan's methods "patch" / "mask"
ATTRIBUTION_CHOICES = {("attribution" if m == "patch" else f"attribution-{m}"): m for m in ATTRIBUTION_METHODS}
METHOD_CHOICES = METHODS + tuple(ATTRIBUTION_CHOICES)
# the batch keys each metric reads (from the prompt lines' "target" / "contrast")
METRIC_NEEDS = {name: as_metric(name).batch_keys() for name in METRIC_NAMES}
# files that make a folder hold a tokenizer (AutoTokenizer on a folder without any returns an
# empty tokenizer that turns every text into no tokens)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")
PATTERN_EXAMPLES = 3  # report.html shows the heads' attention patterns on this many prompts (as many heads as fit its budget)


class UsageError(Exception):
    """A mistake of the user: reported as one line and exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (``headint scan: <message>; see headint scan --help``)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: {' '.join(message.split())}; see '{self.prog} --help'\n")


def _int_list(text: str) -> list[int]:
    items = [x.strip() for x in text.split(",")]
    if not text.strip() or any(not x for x in items):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,2,5, got {text!r}")
    try:
        values = [int(x) for x in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,2,5, got {text!r}") from None
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"lists an index twice: {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'auto', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="headint",
        description="Causal scans of attention heads with interventions inside the attention kernels.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "scan",
        help="scan every head of a local transformers checkpoint on a prompt file",
        description="Replace each attention head's output (or estimate it by attribution) and measure a metric "
        "on every prompt; writes scan.csv (layer, head, [position,] value, stderr), heatmap.png, report.html "
        "and settings.json. Mistakes are reported as one line, exit code 2, before the model is loaded.",
    )
    s.add_argument("model_dir", help="a local transformers causal-LM checkpoint directory (config.json + weights; a tokenizer if prompts are text)")
    s.add_argument("--prompts", required=True, help="JSONL: one example per line, {'text': ...} or {'input_ids': [...]}, with 'target'/'contrast' (ids, or strings of exactly one token) for the metrics that need them")
    s.add_argument("--corrupt", help="JSONL of corrupted prompts, line-aligned with --prompts, each of the same token count as its clean prompt (needed by --method patch/attribution and --normalize)")
    s.add_argument("--metric", default="logit_diff", choices=METRIC_CHOICES, help="logit_diff: logit[target]-logit[contrast] at the last token; logprob/prob: of the target; kl: KL(clean || patched) of the next-token distribution; loss: mean next-token cross-entropy (default: logit_diff)")
    s.add_argument("--method", default="zero", choices=METHOD_CHOICES, help="zero/mean/resample ablation, patch (activation patching from --corrupt), attribution (first-order estimate of patch), attribution-mask (gradient head importance) (default: zero)")
    s.add_argument("--direction", choices=DIRECTIONS, help="for --method patch and attribution only: denoising runs the corrupt prompts with clean head outputs patched in, its effect = value - corrupt baseline (what the head restores); noising runs the clean prompts with corrupt head outputs patched in, its effect = value - clean baseline (default: denoising)")
    s.add_argument("--per-position", action="store_true", help="one intervention per head and position instead of per head")
    s.add_argument("--pairs", action="store_true", help="exact methods only: scan all pairs of heads (finds heads that back each other up); also scans the single heads, to compare")
    s.add_argument("--layers", type=_int_list, help="exact methods only: comma-separated layers to scan (default: all)")
    s.add_argument("--heads", type=_int_list, help="exact methods only: comma-separated heads to scan (default: all)")
    s.add_argument("--normalize", action="store_true", help="report (value - corrupt) / (clean - corrupt): 0 = corrupted, 1 = clean (needs --corrupt); warns when clean and corrupt are within noise")
    s.add_argument("--batch-size", type=_batch_size, default="auto", help="rows per forward pass (intervention x prompt; for attribution: prompts per forward+backward), or 'auto' (default)")
    s.add_argument("--backend", default="auto", choices=backend_names(), help="attention backend (default: auto)")
    s.add_argument("--checkpoint", help="exact methods only: folder to save progress to (one file per finished chunk, a subfolder per scan); re-running the same command resumes from it")
    s.add_argument("--top", type=_positive_int, default=10, help="print the top-k heads (default: 10)")
    s.add_argument("--no-progress", action="store_true", help="hide the progress bars (scan and weight loading)")
    s.add_argument("--out", required=True, help="output directory (created)")

    d = sub.add_parser(
        "demo",
        help="find the induction circuit of the embedded model (the main job)",
        description="Scan the embedded 2-layer model (induction-2l): exact ablation of every head, attribution, "
        "and a pairwise scan; prints the top heads with their pattern scores and writes heatmaps, CSVs, "
        "summary.json and report.html.",
    )
    d.add_argument("--out", default="headint-demo", help="output directory (default: ./headint-demo)")
    d.add_argument("--examples", type=_positive_int, default=64, help="number of prompts (default: 64)")
    d.add_argument("--seed", type=int, default=0, help="seed of the prompts (default: 0)")
    d.add_argument("--backend", default="auto", choices=backend_names(), help="attention backend (default: auto)")
    from .circuits.cli import add_parser as add_circuit_parser

    add_circuit_parser(sub)
    return p


def _fail(message: str, command: str = "scan") -> int:
    """Print ``headint <command>: <message>`` as one line on stderr; the exit code of a usage error (2)."""
    print(f"headint {command}: " + " ".join(str(message).split()), file=sys.stderr)
    return 2


# ---------------------------------------------------------------------- checks without the model


def check_options(args) -> None:
    """Raise UsageError for options that do not apply to the method or need another option."""
    attribution = args.method.startswith("attribution")
    if args.direction is not None and args.method not in ("patch", "attribution"):
        raise UsageError(f"--direction applies to --method patch and attribution only, not --method {args.method}")
    if args.method in ("patch", "attribution") and not args.corrupt:
        raise UsageError(f"--method {args.method} needs --corrupt (the prompts whose head outputs are patched in or out)")
    if args.normalize and not args.corrupt:
        raise UsageError("--normalize needs --corrupt: it reports (value - corrupt) / (clean - corrupt)")
    if attribution:
        for flag, given in (("--pairs", args.pairs), ("--layers", args.layers is not None), ("--heads", args.heads is not None),
                            ("--checkpoint", args.checkpoint is not None)):
            if given:
                raise UsageError(f"{flag} does not apply to --method {args.method} (it estimates every head in one "
                                 "forward and backward pass); use an exact method (zero, mean, resample, patch) or drop it")
    if args.pairs and args.per_position:
        raise UsageError("--pairs and --per-position cannot be combined (a pair scan has one value per pair of heads)")


def check_model_dir(model_dir: Path):
    """The checkpoint's config (loaded without weights); UsageError unless it is a causal LM folder."""
    if not model_dir.exists():
        raise UsageError(f"{model_dir}: no such directory (expected a local transformers checkpoint)")
    if not model_dir.is_dir():
        raise UsageError(f"{model_dir} is a file; expected a transformers checkpoint directory")
    if not (model_dir / "config.json").exists():
        raise UsageError(f"{model_dir} is not a transformers checkpoint (no config.json)")
    check_weight_files(model_dir)
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (ValueError, OSError, KeyError) as e:
        raise UsageError(f"{model_dir}/config.json cannot be read by transformers: {e}") from None
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise UsageError(f"{model_dir} holds a {', '.join(archs)} ({config.model_type}), not a causal language model: it has "
                         "no trained next-token head, so the metrics would read a randomly initialised one; headint scan "
                         "needs a causal LM checkpoint (for encoders use the Python API with a metric on hidden states)")
    if getattr(config, "is_encoder_decoder", False):
        raise UsageError(f"{model_dir} is an encoder-decoder model ({config.model_type}); headint scan needs a decoder-only causal LM")
    return config


def find_tokenizer(model_dir: Path):
    """The folder's tokenizer, or None when it has no tokenizer files."""
    if not any((model_dir / f).exists() for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (ValueError, OSError) as e:
        raise UsageError(f"{model_dir}: its tokenizer files cannot be loaded: {e}") from None


def check_heads(args, shape) -> None:
    for flag, values, n, what in (("--layers", args.layers, shape.n_layers, "layers"), ("--heads", args.heads, shape.n_heads, "heads")):
        bad = [v for v in values or () if not 0 <= v < n]
        if bad:
            raise UsageError(f"{flag} {bad[0]} is out of range: the model has {n} {what} (0 to {n - 1})")
    if args.pairs:
        n = len(args.layers or range(shape.n_layers)) * len(args.heads or range(shape.n_heads))
        if n < 2:
            raise UsageError(f"--pairs needs at least 2 heads to pair, but --layers/--heads select {n}")


def read_prompts(args, model_dir: Path, tokenizer, config) -> tuple[dict, dict | None]:
    """Load --prompts (and --corrupt), refusing anything the scan could not use."""
    from .prompts import example_lines, load_prompts

    vocab = getattr(config, "vocab_size", None)
    max_len = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    no_tok = f"no tokenizer was found in {model_dir} (none of {', '.join(TOKENIZER_FILES)})"
    kwargs = dict(vocab_size=vocab, max_length=max_len, no_tokenizer=no_tok)
    try:
        clean = load_prompts(args.prompts, tokenizer, **kwargs)
        corrupt = load_prompts(args.corrupt, tokenizer, **kwargs) if args.corrupt else None
    except (ValueError, TypeError, OSError) as e:
        raise UsageError(str(e)) from None
    needed = METRIC_NEEDS[args.metric]
    missing = [k for k in needed if k not in clean]
    if missing:
        raise UsageError(f"--metric {args.metric} needs {' and '.join(repr(k) for k in needed)} on every line of "
                         f"{args.prompts}, which has no {missing[0]!r}; add them or choose --metric kl or loss")
    if args.method == "resample" and clean["input_ids"].shape[0] < 2:
        raise UsageError(f"--method resample needs at least 2 prompts (it swaps head outputs between them); {args.prompts} has 1")
    if corrupt is not None:
        n, m = clean["input_ids"].shape[0], corrupt["input_ids"].shape[0]
        if n != m:
            raise UsageError(f"{args.corrupt} has {m} examples but {args.prompts} has {n}; the corrupt prompts must be "
                             "line-aligned with the clean ones, one for each")
        lengths, corrupt_lengths = clean["attention_mask"].sum(1), corrupt["attention_mask"].sum(1)
        diff = (lengths != corrupt_lengths).nonzero().flatten().tolist()
        if diff:
            i = diff[0]
            clean_line, corrupt_line = example_lines(args.prompts)[i], example_lines(args.corrupt)[i]
            raise UsageError(f"{args.corrupt}:{corrupt_line}: {int(corrupt_lengths[i])} tokens, but its clean prompt "
                             f"{args.prompts}:{clean_line} has {int(lengths[i])}; a corrupt prompt must have as many "
                             "tokens as its clean prompt (positions are patched one to one)")
        for key in ("target", "contrast"):
            if key in clean and key not in corrupt:
                corrupt[key] = clean[key]
    return clean, corrupt


def check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; expected a directory (created if missing)")
    parent = next((p for p in [out, *out.parents] if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UsageError(f"--out {out}: {parent} is a file, so the directory cannot be created")


def prepare_out(out: Path) -> list[Path]:
    """Create ``--out`` (and its missing parents) and write and remove a probe file there, so an
    unwritable folder is found before the model loads; returns the folders created, deepest
    first (:func:`remove_empty` takes them away again if the command stops before writing)."""
    import tempfile

    from .files import describe_os_error

    check_out(out)
    created = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".headint-write-check-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        remove_empty(created)
        raise UsageError(f"--out {out}: cannot write there ({describe_os_error(e)})") from None
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) where they are still empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


# ---------------------------------------------------------------------- the model


def _first_line(e: BaseException, limit: int = 300) -> str:
    """``Type: the first non-empty line of the message`` (terminal escapes removed, cut at
    ``limit`` characters)."""
    import re

    lines = [re.sub(r"\x1b\[[0-9;]*m", "", l).strip() for l in str(e).splitlines()]
    text = next((l for l in lines if l), "")
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def _load_error(model_dir: Path, e: BaseException) -> str:
    """One line for a checkpoint ``transformers`` could not load."""
    if isinstance(e, pickle.UnpicklingError):  # torch.load(weights_only=True) refused a pickle weight file
        text = str(e)
        after = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else ""
        why = next((l.strip() for l in after.splitlines() if l.strip()), "") or "not a plain tensor archive"
        why = why.split(". ")[0]
        return (f"{model_dir}: its pickle weight file cannot be loaded safely (torch.load with weights_only=True refuses "
                f"it: {why[:300]}); convert the weights to safetensors with a tool you trust")
    return f"{model_dir} cannot be loaded as a causal language model: {_first_line(e)}"


def check_weight_files(model_dir: Path) -> None:
    """The folder's config and weight files must be regular files (a FIFO would block the load forever)."""
    from .files import regular_file

    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".json"):
            try:
                regular_file(f, "model file")
            except (ValueError, OSError) as e:
                raise UsageError(str(e)) from None


def load_causal_lm(model_dir: Path, no_progress: bool):
    """Load the checkpoint as a causal LM; UsageError if any weight had to be initialised randomly."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    if no_progress:
        hf_logging.disable_progress_bar()  # the weight-loading bar too
    hf_logging.set_verbosity_error()  # the load report is judged below
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    except (ValueError, OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
        # e.g. a pickle pytorch_model.bin that torch.load(weights_only=True) refuses, a truncated file
        raise UsageError(_load_error(model_dir, e)) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (f", ... ({len(missing)} in all)" if len(missing) > 4 else "")
        raise UsageError(f"{model_dir} is not a trained causal LM checkpoint: loading it as {type(model).__name__} left "
                         f"weights that are not in the checkpoint randomly initialised ({shown}), so every metric "
                         "would read an untrained head")
    return model.eval()


def baseline_gap_warning(clean_values, corrupt_values) -> str | None:
    """A warning when ``|mean(clean - corrupt)|`` is below the paired standard error of the
    per-example difference (``clean_values``/``corrupt_values`` ``[N]``): normalising by that gap
    then divides by noise. None when the gap is clear."""
    from .results.stats import finite_mean, finite_stderr

    diff = clean_values.double() - corrupt_values.double()
    gap, se = float(finite_mean(diff)), float(finite_stderr(diff))
    if math.isfinite(gap) and math.isfinite(se) and abs(gap) >= se and gap != 0.0:
        return None
    return (f"--normalize divides by clean - corrupt = {gap:.4g}, which is within its own standard error {se:.4g} "
            f"(paired over {diff.shape[0]} examples): the normalized values are dominated by noise")


def baseline_values(model, clean, corrupt, metric, backend):
    """Per-example metric on the clean and on the corrupt prompts, ``[N]`` each (the corrupt
    one relative to the clean run for metrics that compare with it): the base runs every scan
    starts from (:func:`headint.scans.setup.prepare_scan`), one forward each."""
    from .scans.setup import prepare_scan

    setup = prepare_scan(model, clean, corrupt, metric, kind="baselines", backend=backend)
    with setup.base_runs() as runs:
        return runs.clean_values.detach().cpu(), runs.corrupt_values.detach().cpu()


# ---------------------------------------------------------------------- the scan


def position_tokens(clean: dict, tokenizer) -> list[str] | None:
    """Labels of the ``T`` positions: the tokens of the first prompt without padding, if any."""
    from .tokens import to_str_tokens

    full = (clean["attention_mask"].min(dim=1).values == 1).nonzero().flatten()
    if len(full) == 0:
        return None
    return to_str_tokens(tokenizer, clean["input_ids"][int(full[0])])


def run_scan(args) -> int:
    try:
        check_options(args)
        model_dir = Path(args.model_dir)
        config = check_model_dir(model_dir)
        from .integration.adapter import config_shape

        check_heads(args, config_shape(config))
        tokenizer = find_tokenizer(model_dir)
        clean, corrupt = read_prompts(args, model_dir, tokenizer, config)
        out = Path(args.out)
        created = prepare_out(out)
        rc = 1
        try:
            from .distributed import init_from_env

            init_from_env()  # under torchrun: a process group; the scan splits over it, rank 0 writes the outputs
            model = load_causal_lm(model_dir, args.no_progress)
            rc = _scan_and_write(args, model, model_dir, tokenizer, clean, corrupt, out)
            return rc
        finally:
            if rc != 0:
                remove_empty(created)  # a scan that stopped leaves no empty output folder behind
    except UsageError as e:
        return _fail(str(e))


def _scan_and_write(args, model, model_dir: Path, tokenizer, clean, corrupt, out: Path) -> int:
    from . import attribution_scan, scan
    from .distributed import is_main, main_rank_done
    from .ops import BackendUnavailable
    from .pattern_views import example_patterns, report_heads
    from .integration.structure import model_shape
    from .scans import all_pairs
    from .scans.checkpoint import CheckpointError

    warnings: list[str] = []
    singles = None
    try:
        if args.normalize:
            clean_v, corrupt_v = baseline_values(model, clean, corrupt, args.metric, args.backend)
            if bool((clean_v == corrupt_v).all()):
                return _fail(f"--normalize divides by clean - corrupt, but {args.metric} is the same on the clean and "
                             f"corrupt prompts for every example ({args.corrupt} changes nothing the model responds to)")
            warning = baseline_gap_warning(clean_v, corrupt_v)
            if warning:
                warnings.append(warning)
                print(f"headint scan: warning: {warning}", file=sys.stderr)
        if args.method.startswith("attribution"):
            method = ATTRIBUTION_CHOICES[args.method]
            result = attribution_scan(model, clean, corrupt, args.metric, method=method,
                                      direction=args.direction or "denoising", per_position=args.per_position,
                                      batch_size=None if args.batch_size == "auto" else args.batch_size, backend=args.backend)
        else:
            common = dict(corrupt=corrupt, method=args.method, direction=args.direction or "denoising", layers=args.layers,
                          heads=args.heads, batch_size=args.batch_size, progress=not args.no_progress, backend=args.backend)
            head_sets = all_pairs(model_shape(model), args.layers, args.heads) if args.pairs else None
            result = scan(model, clean, args.metric, per_position=args.per_position, head_sets=head_sets,
                          checkpoint=args.checkpoint, **common)
            if args.pairs:
                singles = scan(model, clean, args.metric, **common)
        if args.normalize:
            result = result.normalized_result()
            singles = singles.normalized_result() if singles is not None else None
        examples = [clean["input_ids"][i][clean["attention_mask"][i] != 0]
                    for i in range(min(PATTERN_EXAMPLES, len(clean["input_ids"])))]
        patterns = example_patterns(model, examples, report_heads(result, [len(ids) for ids in examples]), backend=args.backend)
    except (ValueError, CheckpointError, BackendUnavailable) as e:
        return _fail(str(e))
    if not is_main():  # torchrun: rank 0 writes the outputs, the others wait for it
        main_rank_done()
        return 0
    try:
        files = _write_outputs(args, result, singles, patterns, examples, warnings, model_dir, tokenizer, clean, out)
    except OSError as e:
        return _fail(_os_error_line(e, f"--out {out}"))
    finally:
        main_rank_done()
    print(result.effect_definition if result.has_baseline else "value = the metric with each intervention")
    print(result.top(args.top).to_string(index=False))
    print(f"\nwrote {', '.join(str(f) for f in files)}")
    return 0


def _write_outputs(args, result, singles, patterns, examples, warnings, model_dir: Path, tokenizer, clean, out: Path) -> list[Path]:
    """Write scan.csv, heatmap.png, pair_effects.csv (pairs), report.html and settings.json;
    ``patterns`` of the report's heads on ``examples`` (token ids of the first prompts)."""
    from .results.pairs import pair_frame
    from .tokens import to_str_tokens

    out.mkdir(parents=True, exist_ok=True)
    title = f"{args.method} scan of {model_dir.name} ({args.metric})"
    tokens = position_tokens(clean, tokenizer) if args.per_position else None
    files = [result.to_csv(out / "scan.csv"), out / "heatmap.png"]
    result.heatmap(out / "heatmap.png", title=title, tokens=tokens, singles=singles)
    if singles is not None:
        pair_frame(result, singles).to_csv(out / "pair_effects.csv", index=False)
        files.append(out / "pair_effects.csv")
    files.append(result.to_html(out / "report.html", tokens=tokens, patterns=patterns, pattern_tokens=[to_str_tokens(tokenizer, ids) for ids in examples],
                                singles=singles, title=title, top=args.top, warnings=warnings))
    settings = dict(result.settings, model_dir=str(model_dir), prompts=args.prompts, corrupt=args.corrupt,
                    clean_baseline=result.clean_baseline, corrupt_baseline=result.corrupt_baseline, normalized=args.normalize,
                    warnings=warnings, effect_reference=result.reference,
                    effect_definition=result.effect_definition if result.has_baseline else None)
    (out / "settings.json").write_text(json.dumps(settings, indent=2, default=str))
    files.append(out / "settings.json")
    return files


def _os_error_line(e: OSError, what: str) -> str:
    """``<what>: cannot write <file>: <reason>`` for an error of the file system."""
    where = e.filename if getattr(e, "filename", None) else what
    return f"{what}: cannot write {where}: {e.strerror or e}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        parser.error(_unrecognized(extra, sys.argv[1:] if argv is None else list(argv)))
    try:
        if args.command == "scan":
            return run_scan(args)
        if args.command == "demo":
            from .demo import run_demo

            try:
                prepare_out(Path(args.out))
            except UsageError as e:
                return _fail(str(e), "demo")
            return run_demo(out=args.out, n_examples=args.examples, seed=args.seed, backend=args.backend)
        if args.command == "circuit":
            from .circuits.cli import run as run_circuit

            return run_circuit(args, sys.modules[__name__])
        return 2
    except KeyboardInterrupt:
        return _interrupted(args)


LIST_OPTIONS = ("--layers", "--heads")


def _unrecognized(extra: list[str], argv: list[str]) -> str:
    """argparse's "unrecognized arguments", with what was meant where a list option got its
    items space-separated (``--heads 0 1``)."""
    message = f"unrecognized arguments: {' '.join(extra)}"
    for flag in LIST_OPTIONS:
        if flag in argv:
            i = argv.index(flag)
            following = argv[i + 1 : i + 2 + len(extra)]
            if len(following) > 1 and following[1:] == extra[: len(following) - 1]:
                items = [following[0], *following[1:]]
                return (f"{message} ({flag} takes one comma-separated list: {flag} {','.join(items)}, "
                        f"not {flag} {' '.join(items)})")
    return message


def _interrupted(args) -> int:
    """Ctrl-C: one line on stderr (saying how to resume when a checkpoint holds finished chunks),
    exit code 130."""
    line = f"headint {args.command}: interrupted"
    checkpoint = getattr(args, "checkpoint", None)
    if checkpoint:
        chunks = sum(1 for _ in Path(checkpoint).glob("*/chunk-*.pt")) if Path(checkpoint).is_dir() else 0
        line += (f"; {chunks} finished chunk{'s' if chunks != 1 else ''} saved in {checkpoint}: run the same command "
                 "again to resume" if chunks else f"; no chunk had finished yet (checkpoint {checkpoint})")
    elif args.command == "scan":
        line += " (finished work is lost without --checkpoint DIR; with it, re-running the same command resumes)"
    print(line, file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
