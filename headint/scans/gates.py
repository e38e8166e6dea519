"""Learned head gates: one trainable gate per head, applied as the kernels' head mask.

Two parameterisations:

- ``kind="hard_concrete"`` (Voita et al. 2019, after Louizos et al. 2018): per head a
  ``log_alpha``; in training each row draws ``u ~ U(0, 1)`` and uses
  ``g = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) * (r - l) + l, 0, 1)`` with
  temperature ``beta`` (2/3) and stretch ``(l, r)`` (-0.1, 1.1), so gates are exactly 0 or 1
  with positive probability; the penalty is the expected number of open heads,
  ``L0 = sum sigmoid(log_alpha - beta * log(-l / r))``. The test-time gate is
  ``clamp(sigmoid(log_alpha) * (r - l) + l, 0, 1)``.
- ``kind="sigmoid"``: deterministic soft gates ``g = sigmoid(theta)`` in ``[0, 1]`` with an L1
  penalty ``sum g`` (causal head gating, Nam et al. 2025, uses such gates).

The objective is ``(-metric if maximize else metric).mean() + penalty_weight * penalty``; the
model's weights are frozen (``requires_grad`` False inside, restored after) and the gate
gradients come from the fused kernels' ``d head_mask`` (see :mod:`.masking`).

NaN or infinite metric values follow the scans' rule: each step's objective is the mean over
the rows whose value and gradient are finite (the gradient is taken with respect to each
row's own gates first, so a NaN row, e.g. from ``0 * NaN`` in a branch ``torch.where`` left
out, cannot reach the shared gate parameters); ``intact`` and ``final`` are means over the
finite examples; one :class:`~headint.NaNMetricWarning` says how many were left out and where.
Where no finite value remains (the intact model, a training step) the call is refused.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..results.gates import GateResult
from ..results.stats import finite_mean
from .batching import check_batch_size, run_in_halves
from .masking import NonFinite, ablation_patches, frozen_parameters, check_ablation, finite_or_refuse, mask_plan
from .masking import metric_direction, removed_masks
from ..vocabulary import GATE_KINDS, Ablation, GateKind, check_choice
from ..integration.modes import require_autograd
from .setup import prepare_scan


class HardConcrete:
    """Stretched, clamped Hard-Concrete gates over ``log_alpha`` (any shape)."""

    def __init__(self, temperature: float, stretch: tuple[float, float]):
        self.beta = temperature
        self.low, self.high = stretch

    def sample(self, log_alpha: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Training gates for uniform noise ``u`` (broadcast against ``log_alpha``)."""
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / self.beta)
        return (s * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def deterministic(self, log_alpha: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(log_alpha) * (self.high - self.low) + self.low).clamp(0.0, 1.0)

    def p_open(self, log_alpha: torch.Tensor) -> torch.Tensor:
        """``P(gate != 0)`` per head; its sum is the L0 penalty."""
        return torch.sigmoid(log_alpha - self.beta * math.log(-self.low / self.high))


def _check_real(x, name: str, low: float | None = None, high: float | None = None, open_low: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise TypeError(f"learn_gates: {name} must be a finite number, got {x!r}")
    x = float(x)
    if low is not None and (x < low or (open_low and x == low)):
        raise ValueError(f"learn_gates: {name} must be {'>' if open_low else '>='} {low}, got {x}")
    if high is not None and x > high:
        raise ValueError(f"learn_gates: {name} must be <= {high}, got {x}")
    return x


def learn_gates(
    model,
    inputs,
    loss_or_metric="loss",
    *,
    maximize: bool | None = None,
    kind: GateKind = "hard_concrete",
    penalty_weight: float = 0.01,
    steps: int = 200,
    lr: float = 0.1,
    batch_size: int | None = None,
    init: float = 3.0,
    temperature: float = 2 / 3,
    stretch: tuple[float, float] = (-0.1, 1.1),
    ablation: Ablation = "zero",
    threshold: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    backend: str = "auto",
) -> GateResult:
    """Learn one gate per head that keeps ``loss_or_metric`` good with as few heads as possible.

    Args:
        inputs: ``[N, T]`` token ids or a dict (``input_ids``, ``attention_mask``, and what the
            metric reads: ``labels`` for ``"loss"``, ``target``/``contrast``, ...).
        loss_or_metric: a metric (name, :class:`~headint.metrics.Metric` or callable); per-example
            values ``[N]``. ``maximize`` says its direction; built-in metrics know theirs
            (``"loss"`` and ``"kl"`` are minimised, ``"logit_diff"``, ``"logprob"``, ``"prob"``
            maximised); a custom metric needs ``maximize=True/False``.
        kind: ``"hard_concrete"`` (stochastic L0 gates, penalty = expected open heads) or
            ``"sigmoid"`` (deterministic soft gates, penalty = sum of gates).
        penalty_weight: weight ``lambda`` of the penalty (per head).
        steps, lr: Adam steps and learning rate. batch_size: examples per step (None: all);
            minibatches walk seeded permutations of the examples.
        init: initial ``log_alpha`` / logit of every gate (3.0: all heads open).
        temperature, stretch: the Hard-Concrete ``beta`` and ``(l, r)``, ``l < 0``, ``r > 1``.
        ablation: a closed head's output becomes ``"zero"`` or its ``"mean"`` over the inputs
            (per position, padding left out).
        threshold: a head is open when its deterministic gate is ``>= threshold``.
        seed: seeds the noise and the minibatch order: the same seed gives identical gates.

    Returns a :class:`~headint.results.gates.GateResult` (gate table and heatmap, training
    curve, the metric intact and with the closed heads ablated).
    """
    check_choice(kind, GATE_KINDS, "kind", "learn_gates")
    check_ablation(ablation, "learn_gates")
    penalty_weight = _check_real(penalty_weight, "penalty_weight", low=0.0)
    lr = _check_real(lr, "lr", low=0.0, open_low=True)
    init = _check_real(init, "init")
    threshold = _check_real(threshold, "threshold", low=0.0, high=1.0)
    temperature = _check_real(temperature, "temperature", low=0.0, open_low=True)
    if not (isinstance(stretch, (tuple, list)) and len(stretch) == 2):
        raise TypeError(f"learn_gates: stretch must be a pair (l, r) with l < 0 < 1 < r, got {stretch!r}")
    low, high = (_check_real(s, "stretch") for s in stretch)
    if not (low < 0.0 and high > 1.0):
        raise ValueError(f"learn_gates: stretch must be (l, r) with l < 0 and r > 1, got {tuple(stretch)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"learn_gates: steps must be a positive int, got {steps!r}")
    batch_size = check_batch_size(batch_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"learn_gates: seed must be an int, got {seed!r}")

    require_autograd("headint.learn_gates")
    setup = prepare_scan(model, inputs, None, loss_or_metric, kind="gates", backend=backend)
    up = metric_direction(setup.metric, maximize, "learn_gates")
    shape, N, device = setup.shape, setup.N, setup.device
    L, H = shape.n_layers, shape.n_heads
    hc = HardConcrete(temperature, (low, high))
    rows_per_step = N if batch_size is None else min(batch_size, N)
    gen = torch.Generator().manual_seed(seed)
    params = torch.full((L, H), init, device=device, requires_grad=True)
    opt = torch.optim.Adam([params], lr=lr)

    def gates_now(p: torch.Tensor) -> torch.Tensor:
        return hc.deterministic(p) if kind == "hard_concrete" else torch.sigmoid(p)

    curve = []
    nan = NonFinite(setup.metric, "learn_gates")
    with frozen_parameters(model), setup.base_runs() as runs:
        base = runs.clean
        patches = ablation_patches(base, ablation)
        intact_values = base.base_values().float().cpu()
        finite_or_refuse(intact_values, setup.metric, "learn_gates", "of the intact model")
        nan.note(intact_values, "of the intact model", how="intact is their mean over the finite examples")
        intact = float(finite_mean(intact_values))
        order: list[int] = []
        for step in tqdm(range(steps), desc="headint.learn_gates", disable=not progress, unit="step"):
            if len(order) < rows_per_step:
                order += torch.randperm(N, generator=gen).tolist()
            ex_cpu, order = torch.tensor(order[:rows_per_step]), order[rows_per_step:]
            ex = ex_cpu.to(device)
            with torch.enable_grad():
                if kind == "hard_concrete":
                    u = torch.rand(len(ex), L, H, generator=gen).clamp(1e-6, 1 - 1e-6).to(device)
                    g = hc.sample(params[None], u)  # [R, L, H]
                    penalty = hc.p_open(params).sum()
                else:
                    g = torch.sigmoid(params)[None].expand(len(ex), L, H)
                    penalty = torch.sigmoid(params).sum()
                # each row's own gates: the metric's gradient reaches them first, rows with a
                # non-finite value or gradient are dropped there, then it flows on to params
                row_gates = g.detach().requires_grad_(True)
                values = base.run_differentiable(ex, mask_plan([row_gates[:, l] for l in range(L)], patches)).float()
                ok = finite_or_refuse(values.detach(), setup.metric, "learn_gates", f"of training step {step}'s minibatch", ex_cpu)
                sign = -1.0 if up else 1.0
                (grad,) = torch.autograd.grad(sign * values[ok].sum(), row_gates)
                used = ok & torch.isfinite(grad).flatten(1).all(1)
                if not bool(used.any()):
                    raise ValueError(f"learn_gates: at training step {step} the gradient of metric {setup.metric.name!r} is NaN "
                                     f"or infinite for every example of the minibatch, so the gates cannot be trained; fix "
                                     "the metric (e.g. a NaN in a branch torch.where discards still poisons the gradient)")
                nan.note(torch.where(used, values.detach(), float("nan")), "(value or gradient) in training minibatches",
                         steps=[step] if not bool(used.all()) else (), examples=ex_cpu,
                         how="each step's objective is the mean over its finite rows")
                metric_mean = values.detach()[used].mean()
                objective = sign * metric_mean
                grad = torch.where(used.to(grad.device)[:, None, None], grad, torch.zeros((), device=grad.device)) / int(used.sum())
                opt.zero_grad()
                torch.autograd.backward([g, penalty_weight * penalty], [grad, torch.ones((), device=device)])
                loss = objective + penalty_weight * penalty.detach()
            opt.step()
            with torch.no_grad():
                n_open = int((gates_now(params) >= threshold).sum())
            curve.append(dict(step=step, objective=objective.item(), metric=metric_mean.item(), penalty=penalty.item(),
                              loss=loss.item(), open_heads=n_open, n=int(used.sum())))

        with torch.no_grad():
            params = params.detach()
            if not bool(torch.isfinite(params).all()):  # cannot happen with finite gradients; never returned silently
                raise RuntimeError("learn_gates: the gate parameters became NaN or infinite during training")
            gates = gates_now(params)
            closed = [[(l, h) for l, h in (gates < threshold).nonzero().tolist()]]

            def final_values(rows: torch.Tensor) -> torch.Tensor:
                m = removed_masks(shape, closed, device).expand(len(rows), L, H)
                return base.run(rows.to(device), mask_plan([m[:, l] for l in range(L)], patches)).float().cpu()

            final_per_example = run_in_halves(final_values, torch.arange(N), device, "headint.learn_gates")
            nan.note(final_per_example, "with the closed heads ablated",
                     how="final is their mean over the finite examples (NaN if none is)")
            final = float(finite_mean(final_per_example))
    nan.warn()

    import pandas as pd

    p_open = hc.p_open(params) if kind == "hard_concrete" else gates
    settings = dict(setup.settings, kind=kind, maximize=up, penalty_weight=penalty_weight, steps=steps, lr=lr,
                    batch_size=batch_size, init=init, temperature=temperature, stretch=[low, high], ablation=ablation,
                    threshold=threshold, seed=seed,
                    finite_examples=dict(intact=int(torch.isfinite(intact_values).sum()),
                                         final=int(torch.isfinite(final_per_example).sum()), of=N))
    return GateResult(kind, gates.cpu(), params.cpu(), p_open.cpu(), threshold, pd.DataFrame(curve),
                      setup.metric.name, intact, final, settings)
