"""``ScanResult``: the per-example outcome of a head scan, and its tables.

A scan yields one metric value per intervention (a grid cell) and example:
``per_example`` ``[*grid, N]`` (grids: :mod:`headint.results.grid`). Statistics live in
:mod:`headint.results.stats`, plots in :mod:`headint.results.plots`, files in
:mod:`headint.results.io`; ``ScanResult``'s methods are thin doors to them.
"""

from __future__ import annotations

import json
import operator
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..metrics import normalize
from . import io, plots, report, stats
from .grid import AXES_CHOICES, cell_name, head_set_name
from .settings import Reference, ScanSettings, effect_definition

__all__ = ["ScanResult", "AXES_CHOICES", "head_set_name"]


def _as_head_set(item: Any, index: int) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple((operator.index(layer), operator.index(head)) for layer, head in item)
    except (TypeError, ValueError):
        raise ValueError(
            f"labels[{index}] must be a sequence of (layer, head) int pairs, got {item!r}"
        ) from None
    return pairs


def _as_float_or_none(x: Any, name: str) -> float | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must be a number or None, got a tensor of shape {list(x.shape)}")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number or None, got {type(x).__name__}")
    return float(x)


def _json_settings(settings: Any) -> ScanSettings:
    """Typed settings over a JSON round-tripped copy of ``settings`` (so save/load reproduces
    it exactly); a value outside its vocabulary is a ValueError naming the key."""
    if settings is None:
        return ScanSettings()
    if not isinstance(settings, dict):
        raise TypeError(f"settings must be a JSON-able dict, got {type(settings).__name__}")
    try:
        record = json.loads(json.dumps(settings))
    except (TypeError, ValueError) as e:
        raise TypeError(f"settings must be a JSON-able dict: {e}") from None
    except RecursionError:
        raise ValueError("settings are nested too deeply to be JSON") from None
    return ScanSettings(record)


def _fmt(x: float | None) -> str:
    return "None" if x is None else f"{x:.4g}"


class ScanResult:
    """Per-example metric values of a scan, with the run's baselines and settings.

    per_example: float tensor ``[*grid, N]`` (stored detached on the CPU).
    axes: names of the grid dims: ``("layer", "head")``, ``("layer", "head", "position")``
    or ``("head_set",)``.
    labels: for ``("head_set",)``, one head set (tuple of ``(layer, head)``) per entry.
    metric_name: the metric's name. clean_baseline / corrupt_baseline: the metric's mean
    on the clean / corrupted run (floats or None). settings: JSON-able dict (method,
    direction, model name, ...), kept as :class:`~headint.results.settings.ScanSettings`
    (typed fields for the vocabulary the result reads, a read-only mapping of the whole
    record). normalized: whether values are already (v - corrupt) / (clean - corrupt).
    base_per_example: optional ``[N]``, the metric per example on the base run (the run the
    interventions were applied to, without them: the corrupted run for denoising, the clean
    run otherwise); gives paired standard errors of the effects (:attr:`effect_stderr`, and
    ``effect``/``effect_stderr`` columns in :meth:`to_frame`).

    Effects are measured from the base run (:attr:`reference`): ``effect = value - corrupt
    baseline`` for denoising (what patching the head restores), ``value - clean baseline``
    for noising, ablations and path patching (what the intervention destroys); see
    :mod:`headint.results.settings`.

    Non-finite values: a per-example value that is NaN or +-inf (the metric failed on that
    example) is left out of every aggregate (:attr:`values`, :attr:`stderr`, :attr:`effect`,
    :attr:`effect_stderr`, the tables); :attr:`n` (column ``n``) counts the finite examples
    behind each cell, and a cell without any is NaN. Building a result with such values
    warns once (:class:`~headint.results.NaNMetricWarning`, naming how many, the cells and
    the examples). Cells that are non-finite for every example while other cells have values
    are taken as not scanned (restricted scans leave them NaN) and do not warn.
    """

    def __init__(
        self,
        per_example: torch.Tensor,
        axes: Sequence[str] = ("layer", "head"),
        *,
        labels: Sequence[Sequence[tuple[int, int]]] | None = None,
        metric_name: str = "metric",
        clean_baseline: float | None = None,
        corrupt_baseline: float | None = None,
        settings: dict | None = None,
        normalized: bool = False,
        base_per_example: torch.Tensor | None = None,
    ):
        self._set(
            per_example, axes, labels=labels, metric_name=metric_name, clean_baseline=clean_baseline,
            corrupt_baseline=corrupt_baseline, settings=settings, normalized=normalized,
            base_per_example=base_per_example,
        )
        report = stats.non_finite_report(
            self.per_example, self.base_per_example,
            {"clean_baseline": self.clean_baseline, "corrupt_baseline": self.corrupt_baseline},
            self.metric_name, lambda index: cell_name(self.axes, index, self.labels),
        )
        if report is not None:
            warnings.warn(report, stats.NaNMetricWarning, stacklevel=2)

    def _set(self, per_example, axes, *, labels, metric_name, clean_baseline, corrupt_baseline, settings, normalized,
             base_per_example) -> None:
        """Check and store the fields (no warning: :meth:`_replace` derives results through here)."""
        if not isinstance(per_example, torch.Tensor):
            if isinstance(per_example, np.ndarray):
                per_example = torch.from_numpy(per_example)
            else:
                raise TypeError(f"per_example must be a torch.Tensor [*grid, N], got {type(per_example).__name__}")
        if per_example.dtype == torch.bool or per_example.is_complex():
            raise TypeError(f"per_example must hold real numbers, got {per_example.dtype}")
        if not per_example.is_floating_point():
            per_example = per_example.to(torch.float32)
        axes = tuple(axes)
        if axes not in AXES_CHOICES:
            raise ValueError(f"axes must be one of {list(AXES_CHOICES)}, got {axes}")
        if per_example.dim() != len(axes) + 1:
            raise ValueError(
                f"per_example has shape {list(per_example.shape)}; expected [{', '.join(axes)}, N] "
                f"({len(axes) + 1} dims) for axes {axes}"
            )
        if per_example.shape[-1] < 1:
            raise ValueError(f"per_example has shape {list(per_example.shape)}; expected N >= 1 examples (last dim)")
        if axes == ("head_set",):
            if labels is None:
                raise ValueError("labels (one head set per entry) are required for axes ('head_set',)")
            labels = [_as_head_set(item, i) for i, item in enumerate(labels)]
            if len(labels) != per_example.shape[0]:
                raise ValueError(
                    f"labels has {len(labels)} head sets but per_example has shape {list(per_example.shape)} "
                    f"({per_example.shape[0]} entries)"
                )
        elif labels is not None:
            raise ValueError(f"labels are only used with axes ('head_set',), got axes {axes}")
        if not isinstance(metric_name, str):
            raise TypeError(f"metric_name must be a str, got {type(metric_name).__name__}")

        self.per_example = per_example.detach().cpu()
        self.axes = axes
        self.labels = labels
        self.metric_name = metric_name
        self.clean_baseline = _as_float_or_none(clean_baseline, "clean_baseline")
        self.corrupt_baseline = _as_float_or_none(corrupt_baseline, "corrupt_baseline")
        self.settings = _json_settings(settings)
        self.normalized = bool(normalized)
        if base_per_example is not None:
            base_per_example = torch.as_tensor(base_per_example).detach().cpu().to(self.per_example.dtype)
            if base_per_example.shape != (self.n_examples,):
                raise ValueError(f"base_per_example has shape {list(base_per_example.shape)}; expected [{self.n_examples}] (N)")
        self.base_per_example = base_per_example

    # ------------------------------------------------------------------ shape

    @property
    def grid_shape(self) -> tuple[int, ...]:
        """Sizes of the grid dims, e.g. ``(L, H)``."""
        return tuple(self.per_example.shape[:-1])

    @property
    def n_examples(self) -> int:
        """N, the number of examples."""
        return self.per_example.shape[-1]

    @property
    def reference(self) -> Reference:
        """The run effects are measured from: ``"corrupt"`` for denoising, ``"clean"`` otherwise
        (:attr:`ScanSettings.reference <headint.results.settings.ScanSettings.reference>`)."""
        return self.settings.reference

    @property
    def reference_baseline(self) -> float | None:
        """The metric's mean on the :attr:`reference` run (``corrupt_baseline`` for denoising,
        else ``clean_baseline``); None when unknown."""
        return self.corrupt_baseline if self.reference == "corrupt" else self.clean_baseline

    @property
    def has_baseline(self) -> bool:
        """Whether the :attr:`reference` run's baseline exists (so ``effect`` is defined)."""
        return self.reference_baseline is not None

    @property
    def effect_definition(self) -> str:
        """One line saying what :attr:`effect` is for this result (the plots, the report and the
        command line show it)."""
        return effect_definition(self.settings, self.normalized)

    # ------------------------------------------------------------------ statistics

    def _stat_dtype(self) -> torch.dtype:
        return torch.float64 if self.per_example.dtype == torch.float64 else torch.float32

    @property
    def n(self) -> torch.Tensor:
        """Number of finite examples behind each cell's aggregates, int64 ``[*grid]`` (N unless
        the metric was NaN or infinite for some examples; 0 for a cell not scanned)."""
        return stats.finite_count(self.per_example)

    @property
    def values(self) -> torch.Tensor:
        """Mean over the finite examples ``[*grid]`` (NaN where there is none)."""
        return stats.finite_mean(self.per_example).to(self._stat_dtype())

    @property
    def stderr(self) -> torch.Tensor:
        """Standard error of the mean ``[*grid]`` over the ``n`` finite examples:
        std (ddof=1) / sqrt(n); 0 when n == 1, NaN when n == 0."""
        return stats.finite_stderr(self.per_example).to(self._stat_dtype())

    @property
    def effect(self) -> torch.Tensor:
        """``values - reference_baseline`` ``[*grid]``: the change each intervention caused in
        the run it was applied to. Denoising: ``values - corrupt_baseline`` (what patching the
        head restores); noising, ablations, path patching: ``values - clean_baseline``."""
        baseline = self.reference_baseline
        if baseline is None:
            why = ("a denoising effect is measured from the corrupted run" if self.reference == "corrupt"
                   else "an effect is measured from the clean run")
            raise ValueError(f"effect needs the {self.reference} baseline ({why}), but {self.reference}_baseline is None; "
                             "use .values instead")
        return (stats.finite_mean(self.per_example) - baseline).to(self._stat_dtype())

    @property
    def effect_stderr(self) -> torch.Tensor:
        """Standard error of each intervention's change ``[*grid]``, paired per example with the
        same base run (``value - base`` per example, over the examples where both are finite)
        when ``base_per_example`` is known, else :attr:`stderr`."""
        if self.base_per_example is None or self.n_examples == 1:
            return self.stderr
        return stats.paired_stderr(self.per_example, self.base_per_example).to(self._stat_dtype())

    def normalized_result(self) -> "ScanResult":
        """A new ScanResult with per-example values ``(v - corrupt) / (clean - corrupt)``.

        0 = corrupted behaviour, 1 = clean. Its baselines become 1.0 (clean) and 0.0
        (corrupt); the original ones are kept in ``settings["normalization"]``. Effects keep
        their base run: a normalised denoising effect is the fraction of the gap a head
        restores, a noising or ablation effect minus the fraction it destroys.
        Needs both baselines, distinct. An already normalized result is copied as is.
        """
        if self.normalized:
            return self._replace()
        if self.clean_baseline is None or self.corrupt_baseline is None:
            raise ValueError(
                "normalized_result needs both baselines; got clean_baseline="
                f"{self.clean_baseline} and corrupt_baseline={self.corrupt_baseline}"
            )
        per_example = normalize(self.per_example, self.clean_baseline, self.corrupt_baseline)
        base = None if self.base_per_example is None else normalize(self.base_per_example, self.clean_baseline, self.corrupt_baseline)
        settings = self.settings.replace(normalization={"clean_baseline": self.clean_baseline,
                                                        "corrupt_baseline": self.corrupt_baseline})
        return self._replace(
            per_example=per_example, clean_baseline=1.0, corrupt_baseline=0.0, settings=settings, normalized=True,
            base_per_example=base,
        )

    def _replace(self, **changes: Any) -> "ScanResult":
        """A copy with ``changes``; it does not warn again about non-finite values."""
        fields = dict(
            per_example=self.per_example.clone(),
            axes=self.axes,
            labels=self.labels,
            metric_name=self.metric_name,
            clean_baseline=self.clean_baseline,
            corrupt_baseline=self.corrupt_baseline,
            settings=self.settings,
            normalized=self.normalized,
            base_per_example=self.base_per_example,
        )
        fields.update(changes)
        new = ScanResult.__new__(ScanResult)
        new._set(fields.pop("per_example"), fields.pop("axes"), **fields)
        return new

    # ------------------------------------------------------------------ tables

    def _index_columns(self) -> dict[str, np.ndarray]:
        if self.axes == ("head_set",):
            return {"head_set": np.array([head_set_name(s) for s in self.labels], dtype=object)}
        grids = np.meshgrid(*[np.arange(n) for n in self.grid_shape], indexing="ij")
        return {name: g.reshape(-1) for name, g in zip(self.axes, grids)}

    def to_frame(self):
        """Tidy pandas DataFrame, one row per grid entry (row-major).

        Columns: ``layer, head, value, stderr, n`` / ``layer, head, position, value, stderr, n``
        / ``head_set, value, stderr, n`` (head sets as strings like ``"L0H1+L1H2"``; ``n``
        the number of finite examples behind the cell), then ``effect, effect_stderr`` (see
        :attr:`effect`: measured from the base run) when both the :attr:`reference` baseline
        and ``base_per_example`` are known.
        """
        import pandas as pd

        cols: dict[str, Any] = self._index_columns()
        cols["value"] = self.values.double().reshape(-1).numpy()
        cols["stderr"] = self.stderr.double().reshape(-1).numpy()
        cols["n"] = self.n.reshape(-1).numpy()
        if self.base_per_example is not None and self.has_baseline:
            cols["effect"] = self.effect.double().reshape(-1).numpy()
            cols["effect_stderr"] = self.effect_stderr.double().reshape(-1).numpy()
        return pd.DataFrame(cols)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_frame` to ``path`` as CSV (no index column); returns the path."""
        return io.write_csv(self, path)

    def top(self, k: int = 10, by: str = "abs_effect"):
        """DataFrame of the ``k`` most important entries, most important first.

        by: ``"abs_effect"`` (largest ``|effect|``: the heads that change the metric most from
        the base run, whichever way: for denoising what they restore, for noising and
        ablations what they destroy), ``"effect"`` (largest effect), ``"abs_value"`` or
        ``"value"``. Without the reference baseline, the effect orders fall back to the value
        ones. Columns: those of :meth:`to_frame`, plus ``effect`` when the baseline exists.
        NaN entries come last.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        choices = ("abs_effect", "effect", "abs_value", "value")
        if by not in choices:
            raise ValueError(f"by must be one of {choices}, got {by!r}")
        frame = self.to_frame()
        if self.has_baseline:
            frame["effect"] = self.effect.double().reshape(-1).numpy()
        elif by.endswith("effect"):
            by = by.replace("effect", "value")
        column = "effect" if by.endswith("effect") else "value"
        key = frame[column].to_numpy(dtype=np.float64)
        if by.startswith("abs_"):
            key = np.abs(key)
        key = np.where(np.isnan(key), -np.inf, key)
        order = np.argsort(-key, kind="stable")[: int(k)]
        return frame.iloc[order].reset_index(drop=True)

    # ------------------------------------------------------------------ plots

    def heatmap(self, path: str | os.PathLike | None = None, *, title: str | None = None, value: str = "effect",
                tokens: Sequence[str] | None = None, singles: "ScanResult | None" = None):
        """Plot the scan; returns a ``matplotlib.figure.Figure`` (PNG saved to ``path`` if given).

        See :func:`headint.results.plots.heatmap`: layer x head and (layer, head) x position
        images, or for head sets a bar chart whose error bars are the standard error of the
        plotted quantity (``effect_stderr`` for the effect, ``stderr`` for the value). The
        title states the method, direction and N. tokens: ``P`` strings labelling the position
        axis of a per-position scan (e.g. ``headint.to_str_tokens(tokenizer, ids)``); singles:
        for a head-set scan, the single-head scan whose summed effects are drawn beside each
        set's joint effect.
        """
        return plots.heatmap(self, path, title=title, value=value, tokens=tokens, singles=singles)

    def to_html(self, path: str | os.PathLike, *, tokens: Sequence[str] | None = None, patterns=None,
                pattern_tokens=None, singles: "ScanResult | None" = None, related=(), head_columns=None, circuit=None,
                title: str | None = None, top: int = 10, warnings: Sequence[str] = (), figures=()) -> Path:
        """Write the interactive, self-contained HTML report (no network) to ``path``: settings,
        the heatmap with hover values, a sortable and filterable table of every cell, and, when
        ``patterns`` are given (``{(layer, head): [Tq, Tk]}`` attention probabilities of one
        example or a list of them, one per example, labelled with ``pattern_tokens``), the
        attention patterns of a clicked head with token hover. ``related``
        (:class:`~headint.results.report.RelatedScan`) adds further scans, ``head_columns``
        table columns, ``circuit`` a circuit graph. See :func:`headint.results.report.report_html`.
        Returns the path."""
        return report.write_report(self, path, tokens=tokens, patterns=patterns, pattern_tokens=pattern_tokens,
                                   singles=singles, related=related, head_columns=head_columns, circuit=circuit, title=title,
                                   top=top, warnings=list(warnings), figures=figures)

    def _repr_html_(self) -> str:
        """Notebook view: the report's interactive heatmap and head table (the top 10 rows
        first), with a static table where scripts do not run."""
        return report.notebook_html(self, top=10)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> Path:
        """Save to ``path``: an (existing or ``/``-terminated) directory, getting
        ``scan.safetensors`` + ``scan.json``, or a file stem, getting ``<stem>.safetensors``
        + ``<stem>.json``. per_example goes to safetensors, everything else to the JSON
        sidecar (standard JSON, with the tensor file's sha256; see :mod:`headint.results.io`).
        Both files are written under temporary names first: a save that fails (a full disk)
        raises ``OSError`` naming the file and leaves a result saved there before loadable.
        Returns the stem."""
        return io.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScanResult":
        """Load a result written by :meth:`save` (same ``path`` conventions).

        Reads the tensor file beside the sidecar with the same stem and checks its sha256.
        Raises FileNotFoundError for a missing file, ValueError naming the file for anything
        malformed, missing or mismatched (see :func:`headint.results.io.read`)."""
        json_file, fields = io.read(path)
        try:
            return cls(fields.pop("per_example"), fields.pop("axes"), **fields)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{json_file}: {e}") from None

    # ------------------------------------------------------------------ display

    def __repr__(self) -> str:
        parts = [
            f"metric={self.metric_name!r}",
            f"axes={self.axes}",
            f"grid={list(self.grid_shape)}",
            f"n_examples={self.n_examples}",
            f"clean={_fmt(self.clean_baseline)}",
            f"corrupt={_fmt(self.corrupt_baseline)}",
        ]
        if self.normalized:
            parts.append("normalized=True")
        if self.settings.method is not None:
            parts.append(f"method={self.settings.method!r}")
        if self.settings.direction is not None:
            parts.append(f"direction={self.settings.direction!r}")
        return f"ScanResult({', '.join(parts)})"
