"""What separates a callable metric from ``LogitDiff`` in the all-heads exact scan (issue #25 item 4).

    python bench/metric_paths.py                 # GPT-2-small shape, N=8, 144 heads, 1 thread
    python bench/metric_paths.py --threads 2 --repeats 7

Both paths run the same variant forwards (the final block for the last query only); they differ
in what follows each batch's final hidden states and in what runs once per base run (both in
``headint/scans/metric_logits.py``: ``restricted_logits``, ``last_position_form``):

- ``unembed full``: a callable metric that the last-position probe accepted (``form single``)
  gets the **full-vocabulary** logits of each variant row's last position: ``[R, d] @ [d, V]``;
- ``unembed 2 ids``: ``LogitDiff`` declares its token ids, so each row gets only those ``K = 2``
  columns (``einsum("rd,rkd->rk", h, W[ids])``);
- ``metric on [R, 1, V]`` / ``metric on [R, 2]``: the metric itself on those logits;
- ``probe`` (once per base run, twice in a clean + corrupt scan): the callable run on the base
  run's full logits ``[N, T, V]``, with every other position set to NaN, to seeded noise, and in
  the single form (what ``last_position_form`` does before a scan).

And the two stages of the proposal in the closing note of issue #25 (not in the engine yet):

- ``probe columns (proposal)``: which vocabulary columns the callable reads, found from the
  support of its gradient on the base run's last-position logits ``[N, 1, V]`` and confirmed bit
  for bit with every other column set to NaN and to noise (as the position probe confirms
  positions); a callable that fails the check keeps the full path;
- ``unembed columns (proposal)``: each variant row then unembeds only those columns, handed to the
  callable in a NaN-filled ``[R, 1, V]`` tensor (NaN: a column the probe missed cannot go unseen).

And what the engine now does (``column_form`` / ``column_values`` of
``headint/scans/metric_logits.py``, imported): ``column probe (engine)``, once per base run, on the
callable wrapped as the last-position probe hands it over (``LastPositionOf``, form single), and
``column values (engine)``, per batch: the column unembedding, the NaN fill and the two extreme
fills the engine checks each batch with.

The per-batch stages are timed interleaved (process CPU time: robust on a shared machine) on the scan's batch geometry (``--rows`` rows per batch,
``N * heads`` variant rows in all) and summed over the batches of one scan; the figure to compare
is the difference in seconds per scan against the scan's own time (``bench/scan_vs_hooks.py``,
same shape, same thread count). The other stages are plain torch, the same operations as the engine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--t", type=int, default=32)
    ap.add_argument("--heads", type=int, default=144)
    ap.add_argument("--rows", type=int, default=32, help="variant rows per batch (the scan's geometry)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the medians as JSON")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    W = torch.randn(a.vocab, a.d, generator=g) * 0.02
    b = torch.zeros(a.vocab)
    h = torch.randn(a.rows, a.d, generator=g)
    tgt, con = 11, 22
    ids = torch.tensor([[tgt, con]]).expand(a.rows, 2)
    user = lambda logits: logits[:, -1, tgt] - logits[:, -1, con]  # noqa: E731 - what a user writes
    full = torch.randn(a.n, a.t, a.vocab, generator=g)

    def unembed_full():
        return F.linear(h, W, b)

    def unembed_ids():
        return torch.einsum("rd,rkd->rk", h, W[ids]) + b[ids]

    logits_full = unembed_full()
    logits_ids = unembed_ids()

    def metric_full():
        return user(logits_full[:, None]).float()

    def metric_ids():
        return (logits_ids[:, 0] - logits_ids[:, 1]).float()

    def probe():  # last_position_form's three probes of one base run
        ref = user(full)
        keep = torch.zeros(full.shape[:2], dtype=torch.bool)
        keep[:, -1] = True
        nan = torch.where(keep[..., None], full, torch.full((), float("nan")))
        gg = torch.Generator().manual_seed(1234)
        noise = torch.where(keep[..., None], full, torch.randn(full.shape, generator=gg) * 3 * full.std().clamp_min(1.0) + 1.0)
        return [torch.equal(ref, user(x)) for x in (nan, noise, full[:, -1:])]

    last = full[:, -1:]

    def probe_columns():
        x = last.clone().requires_grad_(True)
        user(x).sum().backward()
        cols = (x.grad != 0).any(0).any(0).nonzero().flatten()
        ref = user(last)
        keep = torch.zeros(a.vocab, dtype=torch.bool)
        keep[cols] = True
        gg = torch.Generator().manual_seed(1234)
        noise = torch.randn(last.shape, generator=gg) * 3 * last.std().clamp_min(1.0) + 1.0
        ok = all(torch.equal(ref, user(torch.where(keep, last, other))) for other in (torch.full((), float("nan")), noise))
        return cols, ok

    cols, ok = probe_columns()
    assert ok and cols.tolist() == sorted({tgt, con}), (cols, ok)

    def unembed_columns():
        out = torch.full((a.rows, 1, a.vocab), float("nan"))
        out[:, 0, cols] = h @ W[cols].T + b[cols]
        return user(out).float()

    torch.testing.assert_close(unembed_columns(), metric_full(), rtol=1e-5, atol=1e-5)

    from headint.metrics import CallableMetric
    from headint.scans.metric_logits import ColumnsOf, LastPositionOf, column_form, column_values

    single = LastPositionOf(CallableMetric(user), "single")
    base_batch = dict(input_ids=torch.zeros(a.n, a.t, dtype=torch.long), attention_mask=torch.ones(a.n, a.t, dtype=torch.long))
    var_rows = dict(input_ids=torch.zeros(a.rows, 1, dtype=torch.long), attention_mask=torch.ones(a.rows, 1, dtype=torch.long))
    base_last = full[:, -1]
    unembed = torch.nn.Linear(a.d, a.vocab)
    with torch.no_grad():
        unembed.weight.copy_(W)
        unembed.bias.copy_(b)

    def engine_probe():
        return column_form(single, [base_last], [base_batch])

    engine_metric, engine_path = engine_probe()
    assert isinstance(engine_metric, ColumnsOf), engine_path

    def engine_values():
        with torch.no_grad():
            return column_values(engine_metric, h[:, None], var_rows, 0, unembed)

    torch.testing.assert_close(engine_values(), metric_full(), rtol=1e-5, atol=1e-5)
    assert engine_metric.fallback_rows == 0

    fns = {"unembed full": unembed_full, "unembed 2 ids": unembed_ids, "metric on [R, 1, V]": metric_full,
           "metric on [R, 2]": metric_ids, "probe (one base run)": probe,
           "probe columns (proposal)": probe_columns, "unembed columns + metric (proposal)": unembed_columns,
           "column probe (engine)": engine_probe, "column values (engine)": engine_values}
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for r in range(a.repeats):
        for k in (fns if r % 2 == 0 else reversed(list(fns))):
            t0 = time.process_time()
            fns[k]()
            times[k].append(time.process_time() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    batches = math.ceil(a.n * a.heads / a.rows)
    per_scan = {
        "callable": batches * (med["unembed full"] + med["metric on [R, 1, V]"]) + 2 * med["probe (one base run)"],
        "LogitDiff": batches * (med["unembed 2 ids"] + med["metric on [R, 2]"]),
        "callable, proposal": batches * med["unembed columns + metric (proposal)"]
        + 2 * (med["probe (one base run)"] + med["probe columns (proposal)"]),
        "callable, engine": batches * med["column values (engine)"]
        + 2 * (med["probe (one base run)"] + med["column probe (engine)"]),
    }
    print(f"# d={a.d} V={a.vocab} rows/batch={a.rows} batches/scan={batches} threads={a.threads} repeats={a.repeats} "
          "(medians of process CPU time)")
    for k, v in med.items():
        print(f"{k:>24}: {1e3 * v:8.3f} ms")
    print(f"per scan: callable {per_scan['callable']:.3f} s, LogitDiff {per_scan['LogitDiff']:.3f} s, "
          f"difference {per_scan['callable'] - per_scan['LogitDiff']:.3f} s; callable with the proposal "
          f"{per_scan['callable, proposal']:.3f} s; callable with the engine's column path {per_scan['callable, engine']:.3f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(args=vars(a), median_s=med, per_scan_s=per_scan, batches=batches), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
