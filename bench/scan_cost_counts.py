"""Work counts of two scans (``result.settings["cost"]``): deterministic, machine-independent.

    python bench/scan_cost_counts.py          # prints one JSON line

A GPT-2-shaped model (4 layers x 4 heads, d 64; random weights, seeded), N=8, T=32 and the
prompts and ``LogitDiff`` of ``bench/scan_vs_hooks.py``: every head with a denoising patch, and a
per-position zero ablation of head 0 of layers 0 and 2. Compare the line before and after an
engine change where wall-clock timings are too noisy (a shared machine): runs, rows,
layer-forwards and token-layer-forwards are what the scan computed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import headint  # noqa: E402
from headint.metrics import LogitDiff  # noqa: E402
from scan_vs_hooks import build_model, make_batch  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model = build_model(dict(n_layer=4, n_head=4, n_embd=64, vocab_size=1000, n_positions=128))
    b = make_batch(model, 8, 32)
    batch = dict(input_ids=b["input_ids"], target=b["target"], contrast=b["contrast"])
    corrupt = dict(input_ids=b["corrupt_ids"], target=b["target"], contrast=b["contrast"])
    heads = headint.scan(model, batch, LogitDiff(), corrupt=corrupt, method="patch", progress=False)
    positions = headint.scan(model, batch, LogitDiff(), method="zero", per_position=True, layers=[0, 2], heads=[0], progress=False)
    print(json.dumps(dict(heads=heads.settings["cost"], positions=positions.settings["cost"],
                          position_reuse=positions.settings.get("position_reuse"))))


if __name__ == "__main__":
    main()
