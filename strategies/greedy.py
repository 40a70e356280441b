"""Greedy per-slot rules (paper section 3.2.3): each slot independently takes the method with the
best score in the sensitivity table; ties go to the earlier method (ibert, fqvit, ivit)."""

from __future__ import annotations

from mnq_search.errors import UsageError
from objectives import LayerScore, get_objective

from mnq_search.context import RunContext

from ._base import Strategy
from ._registry import register_strategy


class GreedyStrategy(Strategy):
    score_name: str = ""
    needs_sensitivity = True

    def select(self, ctx: RunContext) -> dict[str, str]:
        if not ctx.sensitivity:
            raise UsageError(f"strategy {self.name} needs the sensitivity table")
        score: LayerScore = get_objective(self.score_name, LayerScore)()
        rows = {(r["slot"], r["method"]): r for r in ctx.sensitivity}
        out = {}
        for var in ctx.search_space.variables("method"):
            slot = var.name
            best, best_score = None, None
            for method in var.choices:
                row = rows.get((slot, method))
                if row is None:
                    continue
                s = score.score(row)
                if best is None or score.better(s, best_score):
                    best, best_score = method, s
            if best is None:
                raise UsageError(f"the sensitivity table has no row for slot {slot!r}")
            out[slot] = best
        return out


def _greedy(name: str, doc: str):
    cls = type(f"Greedy_{name}", (GreedyStrategy,), {"score_name": name, "description": doc, "__doc__": doc})
    return register_strategy(name)(cls)


SqnrOutputStrategy = _greedy("sqnr_output", "per slot, the method with the highest output ASQNR")
SqnrDiffStrategy = _greedy("sqnr_diff", "per slot, the method with the lowest SQNR diff (the paper's rule as printed)")
SqnrGainStrategy = _greedy("sqnr_gain", "per slot, the method with the highest SQNR diff (least SQNR lost)")
SqnrDiffAbsStrategy = _greedy("sqnr_diff_abs", "per slot, the method with the lowest |SQNR diff|")
