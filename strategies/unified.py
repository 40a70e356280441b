"""``unified``: one score per slot and candidate method from sensitivity, output perturbation and
cost (the unified metric of IPTQ-ViT, whose exact formula is not public; this one is ours).

For slot ``s`` and each candidate method ``m`` of its op:

- ``A(s, m)``: the output ASQNR of the slot in the sensitivity table (dB; every slot quantized
  with ``m``'s family, the paper's measurement), higher is better;
- ``P(s, m)``: the validation KL(float || quantized) of the logits, in nats per image, of the best
  uniform assignment on validation with only slot ``s`` switched to ``m`` (for ``m`` the slot's
  method there, the uniform assignment's own KL), lower is better;
- ``C(s, m)``: the slot's integer-operation cost with ``m`` (the cost table over the slot's
  elements and rows per image, :mod:`objectives.cost`), lower is better.

Each is min-max normalised across the slot's candidates to [0, 1] with 0 the best candidate (a
term equal for every candidate is 0 for all), and the slot takes the method with the lowest
``score = w_A nA + w_P nP + w_C nC`` (ties: the earlier method of the registry). The weights are
the strategy's argument, ``unified:w_A,w_P,w_C`` (non-negative, not all zero; normalised to sum
1); the default :data:`DEFAULT_WEIGHTS` was chosen on validation data (``BENCHMARKS.md``, section
"unified weights", and ``studies/results/unified_weights.csv``). Every term of every candidate is
written to ``search.json`` so that other weights can be replayed without running the model again
(:func:`choose`).

Method parameters (the ``index`` softmax's ``K`` and ``T``) keep their defaults.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence

from mnq_search.context import RunContext
from mnq_search.errors import UsageError
from mnq_search.incremental import evaluator_for

from ._registry import register_strategy
from .local import _ValidationStrategy

DEFAULT_WEIGHTS = (0.5, 0.2, 0.3)  # chosen on held-out validation images: BENCHMARKS.md, section 1c
TERMS = ("asqnr_out", "kl", "cost")


def parse_weights(arg: str | None) -> tuple[float, float, float]:
    if not arg:
        return DEFAULT_WEIGHTS
    parts = arg.split(",")
    try:
        w = tuple(float(p) for p in parts)
    except ValueError:
        w = ()
    if len(w) != 3 or any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
        raise UsageError(f"unified:{arg}: give three weights w_sqnr,w_kl,w_cost (numbers >= 0, not all 0), "
                         "e.g. unified:0.5,0.2,0.3")
    total = sum(w)
    return tuple(v / total for v in w)  # type: ignore[return-value]


def normalised(values: Sequence[float], higher_is_better: bool = False) -> list[float]:
    """Min-max to [0, 1] with 0 the best value; all equal -> all 0."""
    lo, hi = min(values), max(values)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return [0.0] * len(values)
    return [((hi - v) if higher_is_better else (v - lo)) / (hi - lo) for v in values]


def slot_scores(terms: Mapping[str, Mapping[str, float]], weights: Sequence[float]) -> dict[str, float]:
    """``terms``: method -> {"asqnr_out", "kl", "cost"} of one slot; returns method -> score."""
    methods = list(terms)
    cols = [normalised([terms[m]["asqnr_out"] for m in methods], higher_is_better=True),
            normalised([terms[m]["kl"] for m in methods]),
            normalised([terms[m]["cost"] for m in methods])]
    return {m: sum(w * col[i] for w, col in zip(weights, cols)) for i, m in enumerate(methods)}


def choose(table: Mapping[str, Mapping[str, Mapping[str, float]]], weights: Sequence[float]) -> dict[str, str]:
    """slot -> the method with the lowest unified score (ties: the first method listed)."""
    out = {}
    for slot, terms in table.items():
        scores = slot_scores(terms, weights)
        out[slot] = min(scores, key=lambda m: (scores[m], list(terms).index(m)))
    return out


@register_strategy("unified")
class UnifiedStrategy(_ValidationStrategy):
    description = "per slot, the lowest weighted sum of normalised SQNR, single-switch validation KL and cost"
    needs_sensitivity = True
    free_arg = True

    @classmethod
    def check_arg(cls, arg: str) -> None:
        parse_weights(arg)

    def select(self, ctx: RunContext) -> dict[str, str]:
        from objectives.cost import CostObjective

        if not ctx.sensitivity:
            raise UsageError("strategy unified needs the sensitivity table")
        weights = parse_weights(self.arg)
        t = time.perf_counter()
        cost = CostObjective(getattr(ctx.settings.search, "cost_table", None) if ctx.settings.search else None)
        cost.setup(ctx)
        sens = {(r["slot"], r["method"]): r["asqnr_out"] for r in ctx.sensitivity}
        ev = evaluator_for(ctx)
        base, base_kl, family = self.best_uniform(ev, ctx)
        table: dict[str, dict[str, dict[str, float]]] = {}
        for var in ctx.search_space.variables("method"):
            slot, terms = var.name, {}
            for m in var.choices:
                if (slot, m) not in sens:
                    continue  # no sensitivity row (a stand-in's slot): not a candidate
                kl = base_kl if m == base[slot] else ev.score(dict(base, **{slot: m}))
                terms[m] = {"asqnr_out": sens[(slot, m)], "kl": kl,
                            "cost": cost.evaluate({slot: m}, slot_ops=ctx.slot_ops)}
            if not terms:
                raise UsageError(f"the sensitivity table has no row for slot {slot!r}")
            table[slot] = terms
        assignment = {**base, **choose(table, weights)}
        self.info = {"objective": "unified score (normalised ASQNR, validation KL, cost)", "weights": list(weights),
                     "base": family, "kl_base": base_kl, "val_images": ev.n_val, "evaluations": ev.evaluations,
                     "seconds": round(time.perf_counter() - t, 1), "terms": table}
        return assignment
