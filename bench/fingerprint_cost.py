"""What a checkpointed scan pays to fingerprint itself: :func:`headint.scans.fingerprint.fingerprint`
on a GPT-2-small-sized model (124M parameters, random weights from ``GPT2Config()``), next to one
forward pass of that model and to the old fingerprint (shape and sum of each parameter).

    python bench/fingerprint_cost.py [--repeats 5] [--threads 1,2]

Prints the median and min wall time and the median CPU time of ``--repeats`` runs for each;
``--threads`` sets the size of the hashing pool (patched here: it is ``min(8, cpu_count)``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _timed(fn, repeats: int) -> tuple[float, float, float]:
    """Median and min wall seconds, and the median CPU seconds of this process (all threads): on a
    shared machine the CPU time says what the work costs, the wall time what others left of it."""
    times, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(times), min(times), statistics.median(cpu)


def main(argv=None) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    import headint.scans.fingerprint as fp
    from headint.metrics import LogitDiff

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).eval()
    n = sum(p.numel() for p in model.parameters())
    nbytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    batch = {"input_ids": torch.randint(0, 50257, (8, 32)), "attention_mask": torch.ones(8, 32, dtype=torch.long),
             "target": torch.randint(0, 50257, (8,)), "contrast": torch.randint(0, 50257, (8,))}
    print(f"GPT-2 small: {n / 1e6:.1f}M parameters, {nbytes / 1e6:.0f} MB of parameters and buffers; torch threads "
          f"{torch.get_num_threads()}")

    def old():
        for _, p in model.named_parameters():
            float(p.detach().double().sum())

    med, lo, cpu = _timed(old, args.repeats)
    print(f"old fingerprint (shape + sum per parameter): median {med:.3f} s, min {lo:.3f} s, CPU {cpu:.3f} s")
    real_cpu_count = fp.os.cpu_count
    for threads in [int(x) for x in args.threads.split(",")]:
        fp.os.cpu_count = lambda t=threads: t
        try:
            med, lo, cpu = _timed(lambda: fp.fingerprint(model, LogitDiff(), [batch], {"kind": "exact"}), args.repeats)
        finally:
            fp.os.cpu_count = real_cpu_count
        print(f"fingerprint, {threads} hashing thread(s): median {med:.3f} s, min {lo:.3f} s, CPU {cpu:.3f} s "
              f"({nbytes / 1e9 / lo:.2f} GB/s at the min)")
    with torch.no_grad():
        med, lo, cpu = _timed(lambda: model(input_ids=batch["input_ids"]), args.repeats)
    print(f"one forward pass, 8 x 32 tokens: median {med:.3f} s, min {lo:.3f} s, CPU {cpu:.3f} s")


if __name__ == "__main__":
    main()
