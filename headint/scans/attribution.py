"""Attribution patching: first-order estimates of every head's patching effect from one
forward and one backward pass (Nanda 2023, "attribution patching"; Syed et al. 2023),
and gradient head importance (Michel et al. 2019)."""

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
    batch_size: int | None = None,
    memory_budget: int | None = None,
    backend: str = "auto",
    distributed: bool | str = "auto",
) -> ScanResult:
    """Approximate scan: the first-order change of ``metric`` for every head (and position).

    ``method="patch"`` (attribution patching): with ``z`` the head outputs of the base run and
    ``z'`` those of the other run, the estimate is ``(z' - z) . d metric / d z`` per head (summed
    over positions, or per position). ``direction="noising"`` takes the clean run as base and
    patches corrupt ``z'`` in; ``"denoising"`` the reverse.

    ``method="mask"`` (head importance, Michel et al. 2019): the derivative of the metric with
    respect to a multiplicative head mask ``m`` at ``m = 1`` on the clean run; the estimate of
    zero-ablating a head is ``-dmetric/dm`` (importance is its absolute value).

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
    batch_size = check_batch_size(batch_size)
    require_autograd("headint.attribution_scan")
    setup = prepare_scan(model, clean, corrupt, metric, kind="attribution", backend=backend, name="clean")
    shape, N, T, device = setup.shape, setup.N, setup.T, setup.device
    Tm = T if per_position else 1

    ranks = data_parallel_ranks(distributed, model, "headint.attribution_scan")
    with running(ranks), setup.base_runs() as runs:
        if method == "patch" and direction == "denoising":
            base, source = runs.corrupt, runs.clean
        else:
            base, source = runs.clean, runs.corrupt
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
            spec = {l: CallPlan(head_mask=m, head_patch=source.base.z[l][ex.to(source.base.z[l].device)].transpose(1, 2) if method == "patch" else None)
                    for l, m in masks.items()}
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
                    base_baseline=float(finite_mean(base_values)), batch_rows=batch_size,
                    **run_settings)
    return ScanResult(per_example, axes, metric_name=setup.metric.name, **setup.baselines(), settings=settings,
                      base_per_example=base_values)
