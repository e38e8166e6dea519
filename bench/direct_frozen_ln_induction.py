"""Direct effects with and without the final LayerNorm's scale frozen on ``induction-2l``
(issue 24, item 1): activation patching (clean base, corrupt head outputs patched in: noising;
and the reverse), logit difference, per head; ``direct_vs_total`` splits each total effect into
what flows through later heads and what the final LayerNorm's rescaling repairs.

Run: ``OMP_NUM_THREADS=1 python bench/direct_frozen_ln_induction.py`` (output:
``bench/results/direct_frozen_ln_induction.txt``)."""

from __future__ import annotations

import headint
from headint.metrics import LogitDiff
from headint.tasks.induction import induction_prompts

model = headint.models.load("induction-2l")
for n, seed in [(64, 0), (32, 3), (12, 0)]:
    p = induction_prompts(n, seq_len=32, vocab=model.config.vocab_size, seed=seed)
    clean = {"input_ids": p.clean, "target": p.target, "contrast": p.contrast}
    corrupt = {"input_ids": p.corrupted, "target": p.target, "contrast": p.contrast}
    for direction in ("noising", "denoising"):
        both = headint.direct_vs_total(model, clean, LogitDiff(), corrupt=corrupt, method="patch", direction=direction,
                                       progress=False)
        frame = both.to_frame()
        # the share of the frozen-scale direct effect that the recomputed scale takes back
        frame["repaired_by_ln"] = -frame["final_norm"] / frame["direct_frozen_ln"]
        print(f"induction_prompts({n}, seq_len=32, seed={seed}), method='patch', direction={direction!r}, logit_diff")
        print(frame.round(3).to_string(index=False))
        print()
