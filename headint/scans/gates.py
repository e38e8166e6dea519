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

**Tolerance** (``tolerance=x``): which heads stay open depends on the penalty weight, so instead
of fixing it the user asks for the fewest heads that keep the metric's *faithfulness* at least
``x``, measured exactly: with ``M(S)`` the metric (mean over the examples) with every head
outside ``S`` ablated, ``faithfulness(S) = (M(S) - M(none)) / (M(all) - M(none))`` (1: as the
intact model, 0: as with every head ablated; the normalised faithfulness of Wang et al. 2023 and
the MIB benchmark, Mueller et al. 2025; for a metric that is 0 with every head ablated it is
``M(S) / M(all)``, "x of the intact metric"). The penalty weight is searched: training runs
(each seeded with ``seed``, from the same initial gates) at penalty weights growing by ``4x`` from
``penalty_weight`` until the open set no longer keeps the tolerance, then bisection (in log
space) between the largest weight that keeps it and the smallest that does not, until their open
sets differ by one head or their weights by less than 5%; every run's
open set is measured exactly (``GateResult.path``). The kept set is the smallest one that keeps
the tolerance (ties: the most faithful); ``refine=True`` (default) then removes, one at a time,
any kept head whose removal still keeps the tolerance (the removal that keeps the highest
faithfulness first; exact batched forwards), so no single kept head can go.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..results.gates import GateResult
from ..results.stats import finite_mean
from .batching import check_batch_size, run_in_halves
from .masking import NonFinite, ablation_patches, check_ablation, finite_or_refuse, mask_plan
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
    tolerance: float | None = None,
    max_runs: int = 12,
    refine: bool = True,
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
        seed: seeds the noise and the minibatch order: the same seed gives identical gates
            (every run of a tolerance search starts from this seed).
        tolerance: None (one run at ``penalty_weight``), or the faithfulness to keep, in
            ``(0, 1]`` (e.g. 0.9: at least 90% of the way from every head ablated to the intact
            model): the penalty weight is searched (see the module docstring), starting at
            ``penalty_weight``, with at most ``max_runs`` training runs. ``refine``: remove kept
            heads one at a time while the tolerance holds (exact forwards).

    Returns a :class:`~headint.results.gates.GateResult` (gate table and heatmap, training
    curve, the metric intact and with the closed heads ablated). With ``tolerance``: the gates
    and curve of the run whose open set was kept, ``open_heads`` the kept set (after
    ``refine``), ``faithfulness`` its measured faithfulness, ``path`` every run (penalty weight,
    open heads, metric, faithfulness, whether it keeps the tolerance) and ``order()`` the heads
    by the penalty weight at which they close.
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
    if tolerance is not None:
        tolerance = _check_real(tolerance, "tolerance", low=0.0, high=1.0, open_low=True)
        if isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 2:
            raise ValueError(f"learn_gates: max_runs must be an int >= 2 (the search brackets the penalty), got {max_runs!r}")
        if penalty_weight <= 0.0:
            raise ValueError(f"learn_gates: with tolerance=, penalty_weight is where the search starts and must be > 0, got {penalty_weight}")
    if not isinstance(refine, bool):
        raise TypeError(f"learn_gates: refine must be True or False, got {refine!r}")

    require_autograd("headint.learn_gates")
    setup = prepare_scan(model, inputs, None, loss_or_metric, kind="gates", backend=backend)
    up = metric_direction(setup.metric, maximize, "learn_gates")
    shape, N, device = setup.shape, setup.N, setup.device
    L, H = shape.n_layers, shape.n_heads
    hc = HardConcrete(temperature, (low, high))
    rows_per_step = N if batch_size is None else min(batch_size, N)

    def gates_now(p: torch.Tensor) -> torch.Tensor:
        return hc.deterministic(p) if kind == "hard_concrete" else torch.sigmoid(p)

    nan = NonFinite(setup.metric, "learn_gates")
    with setup.base_runs() as runs:  # the replica holds the weights without requires_grad
        base = runs.clean
        patches = ablation_patches(base, ablation)
        intact_values = base.base_values().float().cpu()
        finite_or_refuse(intact_values, setup.metric, "learn_gates", "of the intact model")
        nan.note(intact_values, "of the intact model", how="intact is their mean over the finite examples")
        intact = float(finite_mean(intact_values))

        def train(weight: float, desc: str = "headint.learn_gates") -> tuple[torch.Tensor, list[dict]]:
            """Gate parameters ``[L, H]`` after ``steps`` Adam steps at penalty ``weight``, and the curve."""
            gen = torch.Generator().manual_seed(seed)
            params = torch.full((L, H), init, device=device, requires_grad=True)
            opt = torch.optim.Adam([params], lr=lr)
            curve = []
            order: list[int] = []
            for step in tqdm(range(steps), desc=desc, disable=not progress, unit="step"):
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
                    torch.autograd.backward([g, weight * penalty], [grad, torch.ones((), device=device)])
                    loss = objective + weight * penalty.detach()
                opt.step()
                with torch.no_grad():
                    n_open = int((gates_now(params) >= threshold).sum())
                curve.append(dict(step=step, objective=objective.item(), metric=metric_mean.item(), penalty=penalty.item(),
                                  loss=loss.item(), open_heads=n_open, n=int(used.sum())))
            params = params.detach()
            if not bool(torch.isfinite(params).all()):  # cannot happen with finite gradients; never returned silently
                raise RuntimeError("learn_gates: the gate parameters became NaN or infinite during training")
            return params, curve

        @torch.no_grad()
        def kept_values(kept_sets: list[list[tuple[int, int]]]) -> torch.Tensor:
            """``[S, N]``: the metric with every head outside each kept set ablated (exact forwards)."""
            removed = [[(l, h) for l in range(L) for h in range(H) if (l, h) not in set(k)] for k in kept_sets]
            masks = removed_masks(shape, removed, device)
            var, exs = torch.arange(len(kept_sets)).repeat_interleave(N), torch.arange(N).repeat(len(kept_sets))

            def run(rows: torch.Tensor) -> torch.Tensor:
                m = masks[var[rows].to(device)]
                return base.run(exs[rows].to(device), mask_plan([m[:, l] for l in range(L)], patches)).float().cpu()

            return run_in_halves(run, torch.arange(len(var)), device, "headint.learn_gates").view(len(kept_sets), N)

        search = None
        if tolerance is None:
            params, curve = train(penalty_weight)
            weight_used = penalty_weight
            kept = [(l, h) for l, h in (gates_now(params) >= threshold).nonzero().tolist()]
        else:
            search = _ToleranceSearch(train, lambda p: [(l, h) for l, h in (gates_now(p) >= threshold).nonzero().tolist()],
                                      kept_values, intact, tolerance, setup.metric, max_runs, refine)
            params, curve, weight_used, kept = search.run(penalty_weight)
        with torch.no_grad():
            gates = gates_now(params)
            final_per_example = kept_values([kept])[0]
            nan.note(final_per_example, "with the closed heads ablated",
                     how="final is their mean over the finite examples (NaN if none is)")
            final = float(finite_mean(final_per_example))
    nan.warn()

    p_open = hc.p_open(params) if kind == "hard_concrete" else gates
    settings = dict(setup.settings, kind=kind, maximize=up, penalty_weight=weight_used, steps=steps, lr=lr,
                    batch_size=batch_size, init=init, temperature=temperature, stretch=[low, high], ablation=ablation,
                    threshold=threshold, seed=seed,
                    finite_examples=dict(intact=int(torch.isfinite(intact_values).sum()),
                                         final=int(torch.isfinite(final_per_example).sum()), of=N))
    extra = {}
    if search is not None:
        settings.update(tolerance=tolerance, max_runs=max_runs, refine=refine, start_penalty_weight=penalty_weight,
                        runs=len(search.runs), refined_out=[list(h) for h in search.refined_out])
        extra = dict(kept=sorted(kept), faithfulness=search.faithfulness_of(final), path=search.path_frame(),
                     none_value=search.none_value)
    return GateResult(kind, gates.cpu(), params.cpu(), p_open.cpu(), threshold, pd.DataFrame(curve),
                      setup.metric.name, intact, final, settings, **extra)


class _ToleranceSearch:
    """The penalty-weight search of ``learn_gates(tolerance=...)`` (see the module docstring).

    ``train(weight) -> (params, curve)``; ``open_of(params) -> heads``; ``kept_values(sets) ->
    [S, N]`` exact metric values with every head outside each set ablated."""

    GROWTH = 4.0

    def __init__(self, train, open_of, kept_values, intact: float, tolerance: float, metric, max_runs: int, refine: bool):
        self.train, self.open_of, self.kept_values = train, open_of, kept_values
        self.intact, self.tolerance, self.metric, self.max_runs, self.refine = intact, tolerance, metric, max_runs, refine
        self.runs: list[dict] = []
        self.refined_out: list[tuple[int, int]] = []
        self.none_value = float(finite_mean(kept_values([[]])[0]))
        if not math.isfinite(self.none_value) or abs(self.intact - self.none_value) <= 1e-12 * max(1.0, abs(self.intact)):
            raise ValueError(f"learn_gates: tolerance= needs the metric {metric.name!r} to differ between the intact model "
                             f"({self.intact:.6g}) and every head ablated ({self.none_value:.6g}); faithfulness "
                             "(M(kept) - M(none)) / (M(all) - M(none)) is undefined otherwise")

    def faithfulness_of(self, value: float) -> float:
        return (value - self.none_value) / (self.intact - self.none_value)

    def _run(self, weight: float) -> dict:
        params, curve = self.train(weight, desc=f"headint.learn_gates (penalty {weight:.4g})")
        heads = self.open_of(params)
        value = float(finite_mean(self.kept_values([heads])[0]))
        f = self.faithfulness_of(value)
        run = dict(penalty_weight=weight, params=params, curve=curve, heads=heads, n_open=len(heads), metric=value,
                   faithfulness=f, keeps=bool(math.isfinite(f) and f >= self.tolerance))
        self.runs.append(run)
        return run

    def run(self, start: float):
        """``(params, curve, penalty weight, kept heads)`` of the chosen run (kept set refined)."""
        r = self._run(start)
        good, bad = (r, None) if r["keeps"] else (None, r)
        while len(self.runs) < self.max_runs and (good is None or bad is None):  # bracket the penalty
            if good is None:
                r = self._run(bad["penalty_weight"] / self.GROWTH)
            else:
                if good["n_open"] == 0:
                    break  # every head closed and still faithful: nothing to search
                r = self._run(good["penalty_weight"] * self.GROWTH)
            if r["keeps"]:
                good = r if good is None or r["penalty_weight"] > good["penalty_weight"] else good
            else:
                bad = r if bad is None or r["penalty_weight"] < bad["penalty_weight"] else bad
        while len(self.runs) < self.max_runs and good is not None and bad is not None:  # bisect in log space
            if bad["penalty_weight"] / good["penalty_weight"] < 1.05 or good["n_open"] - bad["n_open"] <= 1:
                break  # bracket closed, or no open-set size left between the two
            r = self._run(math.sqrt(good["penalty_weight"] * bad["penalty_weight"]))
            if r["keeps"]:
                good = r
            else:
                bad = r
        keeping = [r for r in self.runs if r["keeps"]]
        if not keeping:
            raise ValueError(f"learn_gates: no run of the penalty search kept faithfulness >= {self.tolerance} (the smallest "
                             f"penalty weight tried, {min(r['penalty_weight'] for r in self.runs):.3g}, kept "
                             f"{max(r['faithfulness'] for r in self.runs):.3g}); lower penalty_weight (where the search starts) "
                             "or the tolerance, or raise steps")
        best = min(keeping, key=lambda r: (r["n_open"], -r["faithfulness"], r["penalty_weight"]))
        kept = list(best["heads"])
        while self.refine and kept:
            candidates = [[h for h in kept if h != out] for out in kept]
            values = finite_mean(self.kept_values(candidates))
            faith = [self.faithfulness_of(float(v)) for v in values]
            ok = [i for i, f in enumerate(faith) if math.isfinite(f) and f >= self.tolerance]
            if not ok:
                break
            i = max(ok, key=lambda i: (faith[i], -i))
            self.refined_out.append(kept[i])
            kept = candidates[i]
        self.chosen = best
        return best["params"], best["curve"], best["penalty_weight"], kept

    def path_frame(self):
        """One row per training run, in the order they ran."""
        return pd.DataFrame([dict(run=i, penalty_weight=r["penalty_weight"], n_open=r["n_open"],
                                  open_heads=[list(h) for h in r["heads"]], metric=r["metric"], faithfulness=r["faithfulness"],
                                  keeps=r["keeps"], chosen=r is self.chosen) for i, r in enumerate(self.runs)])
