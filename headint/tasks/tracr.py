"""Prompts, metrics and ground truth for the shipped tracr models (``tracr-reverse``, ``tracr-xproportion``).

:func:`tracr_task` gives clean prompts (BOS and ``max_seq_len`` random tokens), corrupt prompts
for resample ablation (another random prompt of the same length, as Miller et al. 2024), and in
the clean batch ``direction`` ``[N, T, n_outputs]``: the clean minus the corrupt run's outputs,
zero at BOS. Two metrics on the outputs at every position after BOS:

- :func:`l2_to_clean` (to minimise): the squared distance of the outputs to the clean run's,
  summed over positions (ACDC's and Miller et al.'s metric for these tasks);
- :func:`projection` (to maximise): the outputs projected on ``direction`` (the tracr analogue of a
  logit difference; its gradient at the clean run is not zero, unlike the L2's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..metrics import CallableMetric
from ..models import load, model_dir

TRACR_MODELS = ("tracr-reverse", "tracr-xproportion")


@dataclass
class TracrTask:
    model: object
    clean: dict
    corrupt: dict
    truth: list[str]
    info: dict


def ground_truth(name: str) -> dict:
    """The model's ``ground_truth.json`` (``edges``: the true edges' names)."""
    if name not in TRACR_MODELS:
        raise ValueError(f"unknown tracr model {name!r}; choose from {TRACR_MODELS}")
    return json.loads((model_dir(name) / "ground_truth.json").read_text())


def tracr_task(name: str, n: int = 32, seed: int = 0, model=None) -> TracrTask:
    info = ground_truth(name)
    model = model if model is not None else load(name)
    enc = model.config.input_encoding
    vocab = [enc[v] for v in info["vocab"]]
    g = torch.Generator().manual_seed(seed)
    T = info["max_seq_len"]

    def prompts():
        toks = torch.tensor(vocab)[torch.randint(len(vocab), (n, T), generator=g)]
        return torch.cat([torch.full((n, 1), enc[info["bos"]]), toks], 1)

    clean, corrupt = prompts(), prompts()
    with torch.no_grad():
        out_c, out_x = model(clean).logits, model(corrupt).logits
    direction = out_c - out_x
    direction[:, 0] = 0
    return TracrTask(model, {"input_ids": clean, "direction": direction}, {"input_ids": corrupt}, list(info["edges"]), info)


def _l2(logits, batch, clean_logits):
    return ((logits[:, 1:].float() - clean_logits[:, 1:].float()) ** 2).sum((1, 2))


def _projection(logits, batch):
    return (logits[:, 1:].float() * batch["direction"][:, 1:].to(logits.device).float()).sum((1, 2))


def l2_to_clean() -> CallableMetric:
    return CallableMetric(_l2, "l2_to_clean", position="all", needs_clean=True, probe_last=False)


def projection() -> CallableMetric:
    return CallableMetric(_projection, "projection", position="all", probe_last=False)
