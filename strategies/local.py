"""Strategies that see how errors propagate: each candidate is scored on the whole model, by the
KL divergence of its logits to the float model's on ``val_size`` validation images (issue 17).
The paper's rules score every slot on its own; these score assignments.

- ``sequential``: the slots in forward order, each taking the method with the lowest validation
  KL while the earlier slots keep their chosen methods and the later ones are still float (the
  float op on the slot's quantized input), the way layer-wise PTQ methods account for upstream
  error; if the result scores worse on validation than the best uniform assignment, that is
  returned instead.
- ``coordinate``: starts from the best uniform assignment on validation and, in passes over the
  slots in forward order, switches a slot's method whenever the validation KL drops; stops when a
  pass changes nothing (at most ``MAX_PASSES`` passes).
- ``per_op``: every combination of one method per op type (18 with the three built-in families),
  the lowest validation KL: the best that mixing at the level of op types can do, a reference for
  how much per-slot mixing adds.

Methods with per-slot parameters (the ``index`` softmax's ``K`` and ``T``): ``sequential`` tries each
parameter of a slot's chosen method in turn, ``coordinate`` treats them as further coordinates while
the slot takes their method, ``per_op`` keeps their defaults.

All are deterministic (ties go to the earlier method of the registry) and cheap: candidates that
differ in one slot are recomputed from that slot's transformer block on
(:class:`mnq_search.incremental.IncrementalEvaluator`). Each reports its trace in ``search.json``.
"""

from __future__ import annotations

import itertools
import time

from mnq_search.context import RunContext
from mnq_search.incremental import evaluator_for, uniform_kls
from mnq_search.methods import OPS, list_families, uniform_assignment
from mnq_search.slot import split_param_key
from mnq_search.space import SearchSpace, Variable

from ._base import Strategy, StrategyResult
from ._registry import register_strategy

MAX_PASSES = 3
TOL = 1e-12  # a switch must lower the KL by more than float noise


def param_variables(space: SearchSpace, slot: str, method: str) -> list[Variable]:
    """The parameter variables of ``method`` on ``slot`` (none for the built-in families)."""
    return [v for v in space.variables("param") if v.group == slot and split_param_key(v.name)[1] == method]


def _take_best(ev, current: dict, var: Variable) -> dict:
    """Score every choice of ``var`` with the rest of ``current`` fixed, set the lowest (ties: the
    earlier choice) into ``current``; returns the trace entry."""
    scores = {c: ev.score(dict(current, **{var.name: c})) for c in var.choices}
    current[var.name] = min(scores, key=lambda c: (scores[c], var.choices.index(c)))
    return {"slot": var.name, "kl": {str(c): v for c, v in scores.items()}}


class _ValidationStrategy(Strategy):
    """Shared part: the evaluator, the best uniform start, the summary."""

    def __init__(self, arg: str | None = None):
        super().__init__(arg)
        self.info: dict = {}

    def validation_images(self, settings) -> int:
        return settings.val_size

    def best_uniform(self, ev, ctx: RunContext) -> tuple[dict[str, str], float, str]:
        kls = uniform_kls(ev, ctx)
        family = min(kls, key=kls.get)
        return uniform_assignment(family, ctx.slot_ops), kls[family], family

    def result(self, ctx: RunContext, assignment: dict[str, str]) -> StrategyResult:
        return StrategyResult(assignment, search=self.info)


@register_strategy("sequential")
class SequentialStrategy(_ValidationStrategy):
    description = "slots in forward order, each the method with the lowest validation KL (later slots float)"

    def select(self, ctx: RunContext) -> dict[str, str]:
        t = time.perf_counter()
        ev = evaluator_for(ctx)
        current = {slot: "float" for slot in ctx.slot_ops}
        trace = []
        for var in ctx.search_space.variables("method"):
            trace.append(_take_best(ev, current, var))
            for pv in param_variables(ctx.search_space, var.name, current[var.name]):  # then its parameters
                trace.append(_take_best(ev, current, pv))
        final = ev.score(current)
        start, start_kl, family = self.best_uniform(ev, ctx)
        fallback = start_kl < final
        self.info = {"objective": "validation KL (nats per image)", "val_images": ev.n_val, "kl": min(final, start_kl),
                     "kl_sequence": final, "best_uniform": family, "kl_best_uniform": start_kl,
                     "returned_best_uniform": fallback, "evaluations": ev.evaluations, "units_run": ev.units_run,
                     "units_per_full_pass": len(ev.units), "seconds": round(time.perf_counter() - t, 1), "trace": trace}
        return start if fallback else ctx.search_space.active(current)


@register_strategy("coordinate")
class CoordinateStrategy(_ValidationStrategy):
    description = "from the best uniform assignment, switch a slot's method while the validation KL drops (passes)"

    def select(self, ctx: RunContext) -> dict[str, str]:
        t = time.perf_counter()
        ev = evaluator_for(ctx)
        current, kl, family = self.best_uniform(ev, ctx)
        start_kl, switches, passes = kl, [], 0
        for passes in range(1, MAX_PASSES + 1):
            changed = False
            for var in ctx.search_space.variables("method"):
                for v in [var] + [pv for m in var.choices for pv in param_variables(ctx.search_space, var.name, m)]:
                    if v.kind == "param" and current[var.name] != split_param_key(v.name)[1]:
                        continue  # a parameter of a method the slot does not take
                    for m in v.choices:
                        if m == current.get(v.name, v.default):
                            continue
                        cand = dict(current, **{v.name: m})
                        cand_kl = ev.score(cand)
                        if cand_kl < kl - TOL:
                            switches.append({"pass": passes, "slot": v.name, "from": current.get(v.name, v.default),
                                             "to": m, "kl": cand_kl})
                            current, kl, changed = cand, cand_kl, True
            if not changed:
                break
        current = ctx.search_space.active(current)
        self.info = {"objective": "validation KL (nats per image)", "val_images": ev.n_val, "start": family,
                     "kl_start": start_kl, "kl": kl, "passes": passes, "switches": switches,
                     "evaluations": ev.evaluations, "units_run": ev.units_run, "units_per_full_pass": len(ev.units),
                     "seconds": round(time.perf_counter() - t, 1)}
        return current


@register_strategy("per_op")
class PerOpStrategy(_ValidationStrategy):
    description = "every combination of one method per op type, the lowest validation KL (op-level mixing)"

    def select(self, ctx: RunContext) -> dict[str, str]:
        t = time.perf_counter()
        ev = evaluator_for(ctx)
        ops = [op for op in OPS if op in set(ctx.slot_ops.values())]
        choices = [sorted({v for var in ctx.search_space.variables("method") if var.group == op for v in var.choices},
                          key=list_families().index) for op in ops]
        scores, best = [], None
        for combo in itertools.product(*choices):
            per_op = dict(zip(ops, combo))
            a = {slot: per_op[op] for slot, op in ctx.slot_ops.items()}
            kl = ev.score(a)
            scores.append({"methods": per_op, "kl": kl})
            if best is None or kl < best[1]:
                best = (a, kl)
        self.info = {"objective": "validation KL (nats per image)", "val_images": ev.n_val, "kl": best[1],
                     "combinations": scores, "evaluations": ev.evaluations, "seconds": round(time.perf_counter() - t, 1)}
        return best[0]
