"""``ScanResult``: the per-example outcome of a head scan, its statistics and views.

A scan yields one metric value per intervention (a grid cell) and example:
``per_example`` ``[*grid, N]``. The grid is one of

* ``("layer", "head")``: ``[L, H]``;
* ``("layer", "head", "position")``: ``[L, H, P]``;
* ``("head_set",)``: ``[S]``, with ``labels[s]`` the head set (a tuple of
  ``(layer, head)`` pairs) of entry ``s``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .metrics import normalize

__all__ = ["ScanResult", "AXES_CHOICES", "head_set_name"]

AXES_CHOICES = (("layer", "head"), ("layer", "head", "position"), ("head_set",))
_FORMAT = "headint.ScanResult"
_VERSION = 1
_DIR_STEM = "scan"


def head_set_name(heads: Sequence[tuple[int, int]]) -> str:
    """``[(0, 1), (1, 2)]`` -> ``"L0H1+L1H2"``; the empty set -> ``"none"``."""
    if len(heads) == 0:
        return "none"
    return "+".join(f"L{int(layer)}H{int(head)}" for layer, head in heads)


def _as_head_set(item: Any, index: int) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple((int(layer), int(head)) for layer, head in item)
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


def _json_settings(settings: Any) -> dict:
    """A JSON round-tripped copy of ``settings`` (so save/load reproduces it exactly)."""
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise TypeError(f"settings must be a JSON-able dict, got {type(settings).__name__}")
    try:
        return json.loads(json.dumps(settings))
    except (TypeError, ValueError) as e:
        raise TypeError(f"settings must be a JSON-able dict: {e}") from None


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
    model name, ...). normalized: whether values are already (v - corrupt) / (clean - corrupt).
    base_per_example: optional ``[N]``, the metric per example on the run the interventions
    were applied to, without them; gives paired standard errors of the effects
    (:attr:`effect_stderr`, and ``effect``/``effect_stderr`` columns in :meth:`to_frame`).
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
    def has_baseline(self) -> bool:
        """Whether a clean baseline exists (so ``effect`` is defined)."""
        return self.clean_baseline is not None

    # ------------------------------------------------------------------ statistics

    def _stat_dtype(self) -> torch.dtype:
        return torch.float64 if self.per_example.dtype == torch.float64 else torch.float32

    @property
    def values(self) -> torch.Tensor:
        """Mean over examples ``[*grid]``."""
        return self.per_example.double().mean(dim=-1).to(self._stat_dtype())

    @property
    def stderr(self) -> torch.Tensor:
        """Standard error of the mean ``[*grid]``: std (ddof=1) / sqrt(N); 0 when N == 1."""
        n = self.n_examples
        if n == 1:
            return torch.zeros(self.grid_shape, dtype=self._stat_dtype())
        sd = self.per_example.double().std(dim=-1, correction=1)
        return (sd / math.sqrt(n)).to(self._stat_dtype())

    @property
    def effect(self) -> torch.Tensor:
        """``values - clean_baseline`` ``[*grid]``: the change each intervention caused."""
        if self.clean_baseline is None:
            raise ValueError("effect needs a clean baseline, but clean_baseline is None; use .values instead")
        return (self.per_example.double().mean(dim=-1) - self.clean_baseline).to(self._stat_dtype())

    @property
    def effect_stderr(self) -> torch.Tensor:
        """Standard error of each intervention's change ``[*grid]``, paired per example
        (``value - base`` per example) when ``base_per_example`` is known, else :attr:`stderr`."""
        if self.base_per_example is None or self.n_examples == 1:
            return self.stderr
        d = (self.per_example - self.base_per_example).double()
        return (d.std(dim=-1, correction=1) / math.sqrt(self.n_examples)).to(self._stat_dtype())

    def normalized_result(self) -> "ScanResult":
        """A new ScanResult with per-example values ``(v - corrupt) / (clean - corrupt)``.

        0 = corrupted behaviour, 1 = clean. Its baselines become 1.0 (clean) and 0.0
        (corrupt); the original ones are kept in ``settings["normalization"]``.
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
        settings = dict(self.settings)
        settings["normalization"] = {"clean_baseline": self.clean_baseline, "corrupt_baseline": self.corrupt_baseline}
        return self._replace(
            per_example=per_example, clean_baseline=1.0, corrupt_baseline=0.0, settings=settings, normalized=True,
            base_per_example=base,
        )

    def _replace(self, **changes: Any) -> "ScanResult":
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
        return ScanResult(fields.pop("per_example"), fields.pop("axes"), **fields)

    # ------------------------------------------------------------------ tables

    def _index_columns(self) -> dict[str, np.ndarray]:
        if self.axes == ("head_set",):
            return {"head_set": np.array([head_set_name(s) for s in self.labels], dtype=object)}
        grids = np.meshgrid(*[np.arange(n) for n in self.grid_shape], indexing="ij")
        return {name: g.reshape(-1) for name, g in zip(self.axes, grids)}

    def to_frame(self):
        """Tidy pandas DataFrame, one row per grid entry (row-major).

        Columns: ``layer, head, value, stderr`` / ``layer, head, position, value, stderr``
        / ``head_set, value, stderr`` (head sets as strings like ``"L0H1+L1H2"``).
        """
        import pandas as pd

        cols: dict[str, Any] = self._index_columns()
        cols["value"] = self.values.double().reshape(-1).numpy()
        cols["stderr"] = self.stderr.double().reshape(-1).numpy()
        if self.base_per_example is not None and self.has_baseline:
            cols["effect"] = self.effect.double().reshape(-1).numpy()
            cols["effect_stderr"] = self.effect_stderr.double().reshape(-1).numpy()
        return pd.DataFrame(cols)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_frame` to ``path`` as CSV (no index column); returns the path."""
        path = Path(path)
        self.to_frame().to_csv(path, index=False)
        return path

    def top(self, k: int = 10, by: str = "abs_effect"):
        """DataFrame of the ``k`` most important entries, most important first.

        by: ``"abs_effect"`` (largest ``|effect|``), ``"effect"`` (largest effect),
        ``"abs_value"`` or ``"value"``. Without a clean baseline, the effect orders fall
        back to the value ones. Columns: those of :meth:`to_frame`, plus ``effect`` when a
        baseline exists. NaN entries come last.
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

    def heatmap(self, path: str | os.PathLike | None = None, *, title: str | None = None, value: str = "effect"):
        """Plot the scan; returns a ``matplotlib.figure.Figure`` (PNG saved to ``path`` if given).

        value: ``"effect"`` (values minus the clean baseline; falls back to ``"value"``
        without one) or ``"value"``. ``("layer", "head")``: a layer x head image;
        ``("layer", "head", "position")``: a (layer*head) x position image;
        ``("head_set",)``: a bar chart with stderr error bars. Images use a diverging
        colour map centred at zero and a colour bar labelled with the metric name.
        """
        from matplotlib.figure import Figure

        if value not in ("effect", "value"):
            raise ValueError(f"value must be 'effect' or 'value', got {value!r}")
        if value == "effect" and not self.has_baseline:
            value = "value"
        data = (self.effect if value == "effect" else self.values).double().numpy()
        label = f"{self.metric_name} ({value}{', normalized' if self.normalized else ''})"
        if title is None:
            method = self.settings.get("method")
            per = {"head_set": "head set", "position": "head and position"}.get(self.axes[-1], "head")
            title = f"{self.metric_name} {value} per {per}"
            if method:
                title += f" ({method})"

        if self.axes == ("head_set",):
            fig = self._bars(Figure, data, label)
        elif self.axes == ("layer", "head"):
            fig = self._layer_head_image(Figure, data, label)
        else:
            fig = self._position_image(Figure, data, label)
        fig.axes[0].set_title(title)
        fig.tight_layout()
        if path is not None:
            fig.savefig(Path(path), format="png", dpi=100)
        return fig

    @staticmethod
    def _symmetric_limit(data: np.ndarray) -> float:
        finite = data[np.isfinite(data)]
        lim = float(np.abs(finite).max()) if finite.size else 0.0
        return lim if lim > 0 else 1.0

    @staticmethod
    def _integer_ticks(axis, n: int, max_labels: int = 32) -> None:
        step = max(1, math.ceil(n / max_labels))
        axis.set_ticks(np.arange(0, n, step))
        axis.set_ticklabels([str(i) for i in range(0, n, step)])

    def _layer_head_image(self, Figure, data: np.ndarray, label: str):
        L, H = data.shape
        fig = Figure(figsize=(min(16.0, max(4.5, 0.4 * H + 2.5)), min(14.0, max(3.5, 0.35 * L + 1.5))))
        ax = fig.add_subplot(1, 1, 1)
        lim = self._symmetric_limit(data)
        im = ax.imshow(data, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        self._integer_ticks(ax.xaxis, H)
        self._integer_ticks(ax.yaxis, L)
        fig.colorbar(im, ax=ax, label=label)
        return fig

    def _position_image(self, Figure, data: np.ndarray, label: str):
        L, H, P = data.shape
        rows = data.reshape(L * H, P)
        fig = Figure(figsize=(min(16.0, max(5.0, 0.4 * P + 3.0)), min(20.0, max(4.0, 0.18 * L * H + 1.5))))
        ax = fig.add_subplot(1, 1, 1)
        lim = self._symmetric_limit(rows)
        im = ax.imshow(rows, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_xlabel("position")
        ax.set_ylabel("layer, head")
        self._integer_ticks(ax.xaxis, P)
        if L * H <= 64:
            ax.set_yticks(np.arange(L * H))
            ax.set_yticklabels([f"L{layer}H{head}" for layer in range(L) for head in range(H)], fontsize=7)
        else:
            step = max(1, math.ceil(L / 32))
            ax.set_yticks(np.arange(0, L, step) * H)
            ax.set_yticklabels([f"L{layer}" for layer in range(0, L, step)])
        for layer in range(1, L):
            ax.axhline(layer * H - 0.5, color="black", linewidth=0.5)
        fig.colorbar(im, ax=ax, label=label)
        return fig

    def _bars(self, Figure, data: np.ndarray, label: str):
        S = data.shape[0]
        names = [head_set_name(s) for s in self.labels]
        fig = Figure(figsize=(min(16.0, max(4.5, 0.5 * S + 2.0)), 4.5))
        ax = fig.add_subplot(1, 1, 1)
        lim = self._symmetric_limit(data)
        from matplotlib import colormaps

        cmap = colormaps["RdBu"]
        colours = [cmap(0.5 + 0.5 * float(np.clip(v / lim, -1, 1))) if np.isfinite(v) else "grey" for v in data]
        x = np.arange(S)
        ax.bar(x, np.nan_to_num(data), yerr=self.stderr.double().numpy(), color=colours, edgecolor="black",
               linewidth=0.5, capsize=3)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=45 if S > 4 else 0, ha="right" if S > 4 else "center", fontsize=8)
        ax.set_xlabel("head set")
        ax.set_ylabel(label)
        return fig

    # ------------------------------------------------------------------ persistence

    @staticmethod
    def _files(path: str | os.PathLike, for_save: bool) -> tuple[Path, Path, Path]:
        """(stem, tensor file, JSON sidecar) for ``path``: a directory or a file stem."""
        text = os.fspath(path)
        for suffix in (".safetensors", ".json"):
            if text.endswith(suffix):
                stem = Path(text[: -len(suffix)])
                break
        else:
            p = Path(text)
            is_dir = p.is_dir() or text.endswith(("/", os.sep))
            if not for_save and not is_dir and not Path(text + ".json").exists() and (p / f"{_DIR_STEM}.json").exists():
                is_dir = True
            stem = p / _DIR_STEM if is_dir else p
        return stem, Path(f"{stem}.safetensors"), Path(f"{stem}.json")

    def save(self, path: str | os.PathLike) -> Path:
        """Save to ``path``: an (existing or ``/``-terminated) directory, getting
        ``scan.safetensors`` + ``scan.json``, or a file stem, getting ``<stem>.safetensors``
        + ``<stem>.json``. per_example goes to safetensors, everything else to the JSON
        sidecar. Returns the stem."""
        from safetensors.torch import save_file

        stem, tensor_file, json_file = self._files(path, for_save=True)
        tensor_file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"per_example": self.per_example.contiguous()}
        if self.base_per_example is not None:
            tensors["base_per_example"] = self.base_per_example.contiguous()
        save_file(tensors, str(tensor_file))
        meta = {
            "format": _FORMAT,
            "version": _VERSION,
            "tensor_file": tensor_file.name,
            "axes": list(self.axes),
            "labels": None if self.labels is None else [[list(p) for p in s] for s in self.labels],
            "metric_name": self.metric_name,
            "clean_baseline": self.clean_baseline,
            "corrupt_baseline": self.corrupt_baseline,
            "settings": self.settings,
            "normalized": self.normalized,
            "grid_shape": list(self.grid_shape),
            "n_examples": self.n_examples,
        }
        json_file.write_text(json.dumps(meta, indent=2))
        return stem

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ScanResult":
        """Load a result written by :meth:`save` (same ``path`` conventions)."""
        from safetensors.torch import load_file

        stem, tensor_file, json_file = cls._files(path, for_save=False)
        if not json_file.exists():
            raise FileNotFoundError(f"no ScanResult at {os.fspath(path)!r}: {json_file} does not exist")
        meta = json.loads(json_file.read_text())
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{json_file} is not a saved ScanResult (format {meta.get('format')!r})")
        tensor_file = json_file.parent / meta.get("tensor_file", tensor_file.name)
        tensors = load_file(str(tensor_file))
        if "per_example" not in tensors:
            raise ValueError(f"{tensor_file} has no 'per_example' tensor (found {sorted(tensors)})")
        labels = meta["labels"]
        if labels is not None:
            labels = [tuple(tuple(p) for p in s) for s in labels]
        return cls(
            tensors["per_example"],
            tuple(meta["axes"]),
            labels=labels,
            metric_name=meta["metric_name"],
            clean_baseline=meta["clean_baseline"],
            corrupt_baseline=meta["corrupt_baseline"],
            settings=meta["settings"],
            normalized=meta["normalized"],
            base_per_example=tensors.get("base_per_example"),
        )

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
        method = self.settings.get("method")
        if method is not None:
            parts.append(f"method={method!r}")
        return f"ScanResult({', '.join(parts)})"
