"""Attribution patching: first-order estimates of every head's patching or ablation effect from
one forward and one backward pass (Nanda 2023, "attribution patching"; Syed et al. 2023),
and gradient head importance (Michel et al. 2019).

Each estimate linearises the exact scan with the same replacement: ``method="zero"``,
``"mean"``, ``"resample"`` and ``"patch"`` approximate :func:`headint.scan` with that
``method`` (the same mean, the same seeded derangement, the same corrupt run), so the two can
be compared head by head (:func:`headint.results.stats.spearman` gives their rank agreement).
"""

from __future__ import annotations


import torch

from ..integration.modes import require_autograd
from ..interventions import CallPlan
from ..plan import TensorPlan
from ..results import ScanResult
from ..results.stats import finite_mean
from .batching import auto_rows, check_batch_size, run_in_halves
from .distributed import agree_rows, data_parallel_ranks, run_chunks, running, settings_of
from ..vocabulary import ATTRIBUTION_METHODS, DIRECTIONS, AttributionMethod, Direction
from .exact import _patch_source
from .setup import prepare_scan


def attribution_scan(
    model,
    clean,
    corrupt=None,
    metric="logit_diff",
    *,
    method: AttributionMethod = "patch",
    direction: Direction = "noising",
    per_position: bool = False,
    mean_inputs=None,
    seed: int = 0,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    distributed: bool | str = "auto",
) -> ScanResult:
    """Approximate scan: the first-order change of ``metric`` for every head (and position).

    With ``z`` the head outputs of the base run and ``z_b`` the replacement (the baseline), the
    estimate is ``(z_b - z) . d metric / d z`` per head (summed over positions, or per position):
    the first-order Taylor term of the exact scan that puts ``z_b`` in place of ``z``. The
    baseline is the one :func:`headint.scan` uses for the same ``method``, so an attribution
    scan approximates exactly one exact scan:

    - ``method="patch"`` (attribution patching, Nanda 2023; Syed et al. 2023): ``z_b`` is the
      other run's ``z``. ``direction="noising"`` takes the clean run as base and patches corrupt
      ``z'`` in; ``"denoising"`` the reverse.
    - ``method="zero"``: ``z_b = 0`` on the clean run (zero ablation).
    - ``method="mean"``: ``z_b`` is each head's output averaged over ``mean_inputs`` (default
      the inputs), per position, padding left out: mean ablation as ``scan(method="mean")``.
    - ``method="resample"``: ``z_b`` is another example's ``z`` (the seeded derangement of
      ``scan(method="resample", seed=seed)``): resample ablation.
    - ``method="mask"`` (head importance, Michel et al. 2019): the derivative of the metric with
      respect to a multiplicative head mask ``m`` at ``m = 1`` on the clean run; the estimate of
      zero-ablating a head is ``-dmetric/dm`` (importance is its absolute value). The same
      numbers as ``"zero"``, under Michel et al.'s name; it approximates *zero* ablation only,
      so compare it with ``scan(method="zero")``, not with a mean-ablation scan.

    Both read the gradient with respect to the blend mask of :func:`headint.attention`
    (``out = m * attn + (1 - m) * patch`` at ``m = 1``): ``dmetric/dm = dO . (attn - patch)``,
    which the fused kernels compute inside their backward pass. Cost: one forward over each
    input set (to record ``z``) and one forward+backward over the base run.

    ``batch_size``: examples per forward+backward; None sizes them from ``memory_budget``
    (bytes; default a share of the free memory, see :mod:`headint.scans.batching`). A chunk
    that runs out of memory is retried in halves. Left-padded inputs get position ids from
    their mask.

    ``distributed``: ``"auto"`` splits the example chunks over the ranks of an initialised
    torch.distributed process group (see :mod:`headint.scans.distributed`); every rank returns
    the identical result, equal to a single process's. ``False``: this process only.

    Returns a :class:`~headint.results.ScanResult` whose per-example values are
    ``base metric + estimate``, directly comparable with :func:`headint.scan`.
    """
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"method must be one of {ATTRIBUTION_METHODS}, got {method!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if method == "patch" and corrupt is None:
        raise ValueError("method='patch' needs corrupt= inputs")
    if mean_inputs is not None and method != "mean":
        raise ValueError(f"mean_inputs= is the reference set of method='mean'; method={method!r} does not read it")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    batch_size = check_batch_size(batch_size)
    require_autograd("headint.attribution_scan")
    setup = prepare_scan(model, clean, corrupt, metric, kind="attribution", backend=backend, name="clean")
    shape, N, T, device = setup.shape, setup.N, setup.T, setup.device
    Tm = T if per_position else 1

    ranks = data_parallel_ranks(distributed, model, "headint.attribution_scan")
    with running(ranks), setup.base_runs() as runs:
        base = runs.corrupt if method == "patch" and direction == "denoising" else runs.clean
        # the exact scan's replacement for this method: [R or 1, H, T, D] per layer (None: zeros)
        baseline = _patch_source("zero" if method == "mask" else method, model, runs.clean, runs.corrupt, base,
                                 mean_inputs, backend, seed, direction, "z")
        base_values = base.base_values()
        if batch_size is None:
            geometry = setup.row_geometry(base, patched_layers=shape.n_layers, keeps_graph=True)
            batch_size = auto_rows(geometry, setup.memory_budget(memory_budget))
        batch_size = agree_rows(ranks, batch_size)
        backward_passes = 0

        def estimate(ex_cpu: torch.Tensor) -> torch.Tensor:
            """``[R, L, H, Tm]``: minus the metric's gradient with respect to each head mask."""
            nonlocal backward_passes
            ex = ex_cpu.to(device)
            att = shape.attention_layers  # a hybrid model's other layers have no heads: NaN rows
            masks = {l: torch.ones(len(ex), shape.n_heads, Tm, device=device, requires_grad=True) for l in att}
            spec = {l: CallPlan(head_mask=m, head_patch=baseline(l, ex)) for l, m in masks.items()}
            with torch.enable_grad():
                values = base.run_differentiable(ex, TensorPlan(spec))
                grads = torch.autograd.grad(values.sum(), list(masks.values()))
            backward_passes += 1
            out = torch.full((len(ex), shape.n_layers, shape.n_heads, Tm), float("nan"))
            out[:, att] = -torch.stack([g.detach().float().cpu() for g in grads], dim=1)
            return out

        starts = list(range(0, N, batch_size))
        # (the replica holds the weights detached: no gradient reaches them, their flags stay as they are)
        parts = run_chunks(ranks, range(len(starts)), lambda i: run_in_halves(
            estimate, torch.arange(starts[i], min(N, starts[i] + batch_size)), device, "headint.attribution_scan"),
            progress=False, desc="headint.attribution_scan")
        estimates = torch.cat([parts[i] for i in range(len(starts))]).permute(1, 2, 3, 0)  # [L, H, Tm, N]
        run_settings = settings_of(ranks, {**runs.cost(), "backward_passes": backward_passes})

    if per_position:
        per_example = estimates + base_values.cpu()[None, None, None, :]
        axes = ("layer", "head", "position")
    else:
        per_example = estimates[:, :, 0] + base_values.cpu()[None, None, :]
        axes = ("layer", "head")
    settings = dict(setup.settings, method=method, direction=direction if method == "patch" else None, per_position=per_position,
                    approximates=dict(method="zero" if method == "mask" else method, direction=direction if method == "patch" else None,
                                      seed=seed if method == "resample" else None),
                    base_baseline=float(finite_mean(base_values)), batch_rows=batch_size,
                    **run_settings)
    return ScanResult(per_example, axes, metric_name=setup.metric.name, **setup.baselines(), settings=settings,
                      base_per_example=base_values)
