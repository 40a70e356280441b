"""Bit allocation as an integer linear program, and the per-layer sensitivity table it scores.

Mix-QViT (Ranjan & Savakis, 2025) scores each (layer, bit-width) choice by the layer's importance
times its quantization sensitivity (the validation-loss increase when only that layer is
quantized at those bits, every other layer at the baseline) and picks one choice per layer under
a resource budget. With binary ``x[l, k]`` (layer ``l`` takes option ``k``) that is::

    minimise    sum_lk score[l, k] x[l, k]
    subject to  sum_k x[l, k] = 1                       for every layer l
                sum_lk cost[l, k] x[l, k] <= budget       (BOPs)
                sum_lk size[l, k] x[l, k] <= size_budget  (optional: weight bytes)

solved with :func:`scipy.optimize.milp` (HiGHS, relative gap 0: the optimum, not an approximate one).
Every score belongs to one (layer, option), so the objective is linear in the one-hot choice.
HiGHS accepts constraints broken by less than its feasibility tolerance; every solution is
checked exactly against the budgets, and one that breaks them is cut off and the program solved
again, so the returned cost never exceeds the budget.

Ties are broken deterministically: among allocations whose score is within ``1e-9`` of the
optimum (after scaling scores so that the largest is 1), the cheapest; then, layer by layer in the
given order, the option listed first. Each tie-break is one more small ILP with the previous
criteria as constraints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import LinearConstraint, milp

from mnq_search.errors import UsageError

Bits = tuple[int, int]
_TIE = 1e-9


@dataclass(frozen=True)
class Option:
    """One candidate of a layer.

    Attributes:
        bits: (w_bits, a_bits).
        cost: its cost toward the budget (BOPs).
        score: what the allocation minimises (importance x sensitivity).
        size: its cost toward the optional second budget (weight bytes).
    """

    bits: Bits
    cost: float
    score: float
    size: float = 0.0


@dataclass(frozen=True)
class Allocation:
    """The chosen option of every layer.

    Attributes:
        choice: layer -> (w_bits, a_bits), in the options' layer order.
        objective: the total score.
        cost: the total cost (<= the budget).
        size: the total size.
    """

    choice: dict[str, Bits]
    objective: float
    cost: float
    size: float


def sensitivity_table(layers: Iterable[str], candidates: Sequence[Bits] | Mapping[str, Sequence[Bits]],
                      loss_with: Callable[[str, Bits], float], baseline: float,
                      baseline_bits: Bits | None = None) -> dict[str, dict[Bits, float]]:
    """Quantization sensitivity of every layer at every candidate bit-width.

    Args:
        layers: the layer names.
        candidates: (w_bits, a_bits) pairs for every layer, or layer -> its pairs.
        loss_with: ``loss_with(layer, bits)``: the validation loss with only ``layer`` at
            ``bits``, every other layer at the baseline.
        baseline: the validation loss with every layer at the baseline.
        baseline_bits: if given, that pair is the baseline itself: 0 without calling ``loss_with``.

    Returns:
        layer -> {bits: loss_with(layer, bits) - baseline}.
    """
    if not math.isfinite(baseline):
        raise UsageError(f"the baseline loss must be finite, got {baseline}")
    table: dict[str, dict[Bits, float]] = {}
    for layer in layers:
        pairs = candidates[layer] if isinstance(candidates, Mapping) else candidates
        if not pairs:
            raise UsageError(f"{layer}: no candidate bit-widths")
        row: dict[Bits, float] = {}
        for bits in pairs:
            bits = (int(bits[0]), int(bits[1]))
            if baseline_bits is not None and bits == tuple(baseline_bits):
                row[bits] = 0.0
                continue
            loss = float(loss_with(layer, bits))
            if not math.isfinite(loss):
                raise UsageError(f"{layer} at w{bits[0]}a{bits[1]}: the loss is {loss}")
            row[bits] = loss - baseline
        table[layer] = row
    if not table:
        raise UsageError("no layers to measure")
    return table


def build_options(sensitivity: Mapping[str, Mapping[Bits, float]], macs: Mapping[str, int],
                  importance: Mapping[str, float] | None = None,
                  params: Mapping[str, tuple[int, int]] | None = None,
                  default: Bits = (8, 8), bias_bits: int = 32) -> dict[str, list[Option]]:
    """The options of every layer: cost in BOPs, score = importance x sensitivity, size in bytes.

    Layers of ``macs`` without a sensitivity row keep ``default`` bits (one option, score 0), so
    the total cost covers the whole model, as :func:`~mnq_search.mixprec.parse_budget` does.

    Args:
        sensitivity: layer -> {bits: sensitivity} (:func:`sensitivity_table`).
        macs: layer -> MACs per image (:func:`~mnq_search.mixprec.layer_macs`).
        importance: layer -> importance (default 1 for every layer).
        params: layer -> (weights, biases), for the size (default: sizes 0).
        default: the bits of layers without a sensitivity row.
        bias_bits: bias width for the size.

    Returns:
        layer -> options, in ``macs`` order.
    """
    missing = sorted(set(sensitivity) - set(macs))
    if missing:
        raise UsageError(f"no MACs for layers: {', '.join(missing)}")
    if importance is not None:
        missing = sorted(set(sensitivity) - set(importance))
        if missing:
            raise UsageError(f"no importance for layers: {', '.join(missing)}")
    if params is not None:
        missing = sorted(set(macs) - set(params))
        if missing:
            raise UsageError(f"no parameter counts for layers: {', '.join(missing)}")
    options: dict[str, list[Option]] = {}
    for layer, m in macs.items():
        row = sensitivity.get(layer, {tuple(default): 0.0})
        imp = 1.0 if importance is None or layer not in sensitivity else float(importance[layer])
        opts = []
        for bits, sens in row.items():
            w, a = int(bits[0]), int(bits[1])
            size = 0.0 if params is None else (w * params[layer][0] + bias_bits * params[layer][1]) / 8
            opts.append(Option((w, a), float(m) * w * a, imp * float(sens) if layer in sensitivity else 0.0, size))
        options[layer] = opts
    return options


def _as_option(layer: str, o) -> Option:
    try:
        o = o if isinstance(o, Option) else Option(*o)
        o = Option((int(o.bits[0]), int(o.bits[1])), float(o.cost), float(o.score), float(o.size))
    except (TypeError, ValueError, IndexError):
        raise UsageError(f"{layer}: an option must be Option(bits, cost, score[, size]), got {o!r}") from None
    if not all(math.isfinite(v) for v in (o.cost, o.score, o.size)):
        raise UsageError(f"{layer}: option {o.bits} has a non-finite cost, score or size")
    if o.cost < 0 or o.size < 0:
        raise UsageError(f"{layer}: option {o.bits} has a negative cost or size")
    return o


class _Program:
    """The multiple-choice program in matrix form, with exact checks of rounded solutions."""

    def __init__(self, options: Mapping[str, Sequence[Option]]):
        self.layers = list(options)
        self.opts = [list(options[name]) for name in self.layers]
        self.n = sum(len(o) for o in self.opts)
        self.score = np.array([o.score for row in self.opts for o in row], dtype=np.float64)
        self.cost = np.array([o.cost for row in self.opts for o in row], dtype=np.float64)
        self.size = np.array([o.size for row in self.opts for o in row], dtype=np.float64)
        self.index = np.array([k for row in self.opts for k in range(len(row))], dtype=np.float64)
        self.group = np.zeros((len(self.layers), self.n))
        start = 0
        for i, row in enumerate(self.opts):
            self.group[i, start:start + len(row)] = 1
            start += len(row)
        self.starts = np.cumsum([0] + [len(r) for r in self.opts])[:-1]
        top = np.abs(self.score).max()
        self.score_scale = top if top > 0 else 1.0

    def solve(self, objective: np.ndarray, rows: list[tuple[np.ndarray, float]],
              fixed: np.ndarray | None = None) -> np.ndarray | None:
        """Binary ``x`` minimising ``objective`` with every ``row . x <= bound``; None if infeasible.

        ``rows`` are checked exactly on the rounded solution. One the solver accepted within its
        feasibility tolerance but that breaks a row is cut off (a no-good cut: not this exact
        choice again) and the program solved again.
        """
        lb = np.zeros(self.n) if fixed is None else fixed.copy()
        cons = [LinearConstraint(self.group, 1, 1)]
        for coef, bound in rows:
            scale = max(np.abs(coef).max(), abs(bound), 1e-300)
            cons.append(LinearConstraint(coef[None, :] / scale, -np.inf, bound / scale))
        for _ in range(100):
            res = milp(objective, integrality=np.ones(self.n), bounds=(lb, np.ones(self.n)), constraints=cons,
                       options={"mip_rel_gap": 0.0})
            if res.x is None:
                return None
            x = np.round(res.x)
            if all(float(coef @ x) <= bound for coef, bound in rows):
                return x
            cons.append(LinearConstraint(x[None, :], -np.inf, len(self.layers) - 1))
        return None

    def choice(self, x: np.ndarray) -> list[int]:
        return [int(np.argmax(x[s:s + len(row)])) for s, row in zip(self.starts, self.opts)]


def allocate_bits(options: Mapping[str, Sequence[Option]], budget: float,
                  size_budget: float | None = None) -> Allocation:
    """Choose one option per layer minimising the total score under the budget(s).

    Args:
        options: layer -> its options (:class:`Option`, or (bits, cost, score[, size]) tuples).
        budget: the maximum total cost (e.g. from :func:`~mnq_search.mixprec.parse_budget`).
        size_budget: the maximum total size, if any.

    Returns:
        The optimal :class:`Allocation` (ties broken as the module docstring says).
    """
    if not options:
        raise UsageError("no layers to allocate bits to")
    checked = {}
    for layer, opts in options.items():
        if not opts:
            raise UsageError(f"{layer}: no options")
        checked[layer] = [_as_option(layer, o) for o in opts]
    for name, value in (("budget", budget), ("size budget", size_budget)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise UsageError(f"the {name} must be a positive number, got {value}")
    cheapest = sum(min(o.cost for o in opts) for opts in checked.values())
    if cheapest > budget:
        raise UsageError(f"budget {budget:.10g} is below the cheapest setting's cost {cheapest:.10g}")
    if size_budget is not None:
        smallest = sum(min(o.size for o in opts) for opts in checked.values())
        if smallest > size_budget:
            raise UsageError(f"size budget {size_budget:.10g} is below the smallest setting's size {smallest:.10g}")
    prog = _Program(checked)
    rows = [(prog.cost, float(budget))]
    if size_budget is not None:
        rows.append((prog.size, float(size_budget)))
    scaled = prog.score / prog.score_scale
    x = prog.solve(scaled, rows)
    if x is None:
        both = "" if size_budget is None else f" and the size budget {size_budget:.10g}"
        raise UsageError(f"no allocation meets the budget {budget:.10g}{both}")
    best = float(scaled @ x)
    rows.append((scaled, best + _TIE))
    cheaper = prog.solve(prog.cost / budget, rows)
    x = cheaper if cheaper is not None else x
    rows.append((prog.cost, float(prog.cost @ x)))
    fixed = np.zeros(prog.n)
    for i, start in enumerate(prog.starts):
        k = prog.choice(x)[i]
        if k > 0:  # an earlier option of this layer may tie: take the first that still does
            sel = np.zeros(prog.n)
            sel[start:start + len(prog.opts[i])] = prog.index[start:start + len(prog.opts[i])]
            better = prog.solve(sel, rows, fixed)
            x = better if better is not None else x
        fixed[start + prog.choice(x)[i]] = 1
    picks = prog.choice(x)
    chosen = [prog.opts[i][k] for i, k in enumerate(picks)]
    return Allocation(choice={layer: o.bits for layer, o in zip(prog.layers, chosen)},
                      objective=float(sum(o.score for o in chosen)), cost=float(sum(o.cost for o in chosen)),
                      size=float(sum(o.size for o in chosen)))
