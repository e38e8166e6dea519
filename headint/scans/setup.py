"""The opening every scan shares: normalised inputs, pairing, position ids, base runs.

:func:`prepare_scan` checks and normalises the inputs without running the model (so a scan
can validate its own arguments against ``shape`` and ``T`` first); :meth:`ScanSetup.base_runs`
then runs the clean (and corrupted) inputs once, in a private replica of the model (eval mode;
the model itself is only read, see :mod:`headint.integration.replica`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ..metrics import Metric, as_metric
from ..integration.adapter import input_device
from ..integration.structure import model_replica, model_shape
from ..shape import ModelShape
from ..results.stats import finite_mean
from ..tokens import check_token_ids, vocab_size
from .batching import RowGeometry, default_memory_budget, metric_logits_per_row
from .positions import with_position_ids
from .inputs import input_layout, paired_batches
from .runner import BaseRuns, VariantRunner, base_runs


@dataclass
class ScanSetup:
    """What a scan starts from.

    ``clean``/``corrupt``: batches ``{input_ids [N, T], attention_mask [N, T], position_ids
    [N, T] (left-padded batches), target, contrast, ...}``; ``settings``: the settings every
    scan reports (kind, metric, model, backend, n_examples, seq_len); ``runs``: the base runs,
    set inside :meth:`base_runs`.
    """

    model: Any
    metric: Metric
    shape: ModelShape
    clean: dict
    corrupt: dict | None
    device: torch.device
    backend: str
    settings: dict
    runs: BaseRuns | None = field(default=None, repr=False)

    @property
    def N(self) -> int:
        return int(self.clean["input_ids"].shape[0])

    @property
    def T(self) -> int:
        return int(self.clean["input_ids"].shape[1])

    @property
    def clean_runner(self) -> VariantRunner:
        assert self.runs is not None, "inside ScanSetup.base_runs() only"
        return self.runs.clean

    @property
    def corrupt_runner(self) -> VariantRunner | None:
        assert self.runs is not None, "inside ScanSetup.base_runs() only"
        return self.runs.corrupt

    @property
    def clean_values(self) -> torch.Tensor:
        return self.runs.clean_values

    @property
    def corrupt_values(self) -> torch.Tensor | None:
        return self.runs.corrupt_values

    def baselines(self) -> dict:
        """``clean_baseline`` / ``corrupt_baseline`` (means over the examples where the metric is
        finite, so one NaN example does not make every effect NaN) for a ScanResult."""
        return dict(clean_baseline=float(finite_mean(self.clean_values)),
                    corrupt_baseline=None if self.corrupt_values is None else float(finite_mean(self.corrupt_values)))

    @contextlib.contextmanager
    def base_runs(self) -> Iterator[BaseRuns]:
        """Inside: the base runs done, in a new private replica of the model (in eval mode; the
        model's own train/eval flags are never changed)."""
        self.runs = base_runs(model_replica(self.model), self.clean, self.corrupt, self.metric, self.backend)
        yield self.runs

    def row_geometry(self, runner: VariantRunner, patched_layers: int = 1, keeps_graph: bool = False) -> RowGeometry:
        """The per-row memory geometry of variant runs of ``runner`` (see :mod:`.batching`)."""
        cfg = self.model.config.get_text_config() if hasattr(self.model.config, "get_text_config") else self.model.config
        d = int(cfg.hidden_size)
        d_ffn = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d)
        vocab = int(getattr(cfg, "vocab_size", None) or 0)
        param = next(self.model.parameters())
        logits = metric_logits_per_row(runner.metric, runner.batch, self.T, vocab, runner.restricted)
        return RowGeometry(self.shape, self.T, d, d_ffn, vocab, logits, param.element_size(), patched_layers, keeps_graph)

    def memory_budget(self, memory_budget: int | None) -> int:
        return default_memory_budget(self.device) if memory_budget is None else memory_budget


ANSWER_KEYS = ("target", "contrast")  # token ids the metrics read at the last position


def check_batch_ids(model, batch: dict, name: str, layout=None) -> None:
    """The token ids of ``batch``: ``input_ids`` ``[N, T]`` (N, T >= 1, integers within the
    model's vocabulary; an encoder-decoder's encoder ids too) and, where present, the answers
    ``target``/``contrast`` ``[N]`` (integers within it); errors name ``name`` and the input as
    the caller named it (e.g. ``inputs['decoder_input_ids']``) and the id. ``layout``: the
    model's :class:`~headint.scans.inputs.InputLayout` (how the batch's names map to the forward's)."""
    vocab = vocab_size(model)
    for key in ("input_ids", "encoder_input_ids"):
        if key in batch:
            called = layout.forward_name(key) if layout is not None else key
            check_token_ids(batch[key], vocab, f"{name}[{called!r}]")
    for key in ANSWER_KEYS:
        if key in batch:
            ids = batch[key]
            if ids.dim() == 1:
                ids = ids[:, None]
            check_token_ids(ids, vocab, f"{name}[{key!r}]", shape="[N] or [N, k]")


def prepare_scan(model, inputs, corrupt, metric, *, kind: str, backend: str, name: str = "inputs") -> ScanSetup:
    """Check and normalise a scan's inputs (no model run).

    ``inputs``/``corrupt``: ``[N, T]`` token ids or dicts (see :func:`~headint.scans.inputs.as_batch`),
    of the same shape. Left-padded batches get ``position_ids`` from their mask (see
    :mod:`.positions`), so every example gives the values it gives alone.
    """
    metric = as_metric(metric)
    shape = model_shape(model)
    layout = input_layout(model)
    clean_b, corrupt_b = paired_batches(inputs, corrupt, name, layout)
    check_batch_ids(model, clean_b, name, layout)
    if corrupt_b is not None:
        check_batch_ids(model, corrupt_b, "corrupt", layout)
    clean_b = with_position_ids(model, clean_b, name, layout)
    if corrupt_b is not None:
        corrupt_b = with_position_ids(model, corrupt_b, "corrupt", layout)
    device = input_device(model)
    N, T = clean_b["input_ids"].shape
    settings = dict(kind=kind, metric=repr(metric), model=type(model).__name__, backend=backend, n_examples=int(N), seq_len=int(T))
    if shape.attention_layers != list(range(shape.n_layers)):  # a hybrid model: scans cover its attention layers only
        settings["attention_layers"] = shape.attention_layers
    return ScanSetup(model, metric, shape, clean_b, corrupt_b, device, backend, settings)
