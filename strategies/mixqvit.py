"""``mixqvit``: bit-width per weight layer under a BOP budget (Mix-QViT, Ranjan & Savakis 2025), then
the non-linear methods (issue 14).

1. Methods for the sensitivity: the best uniform family on validation (KL to the float logits), at
   the model's baseline bits (``--bits``, default 8).
2. Sensitivity: the validation KL increase when one weight layer alone takes each candidate of
   ``--search-bits`` (weight and activation bits together), every other layer at the baseline
   (``--bit-sensitivity-cache FILE`` keeps the table for runs with other budgets or importances).
3. Importance: 1 for every layer (``--importance none``, the default: the KL is already measured at
   the model's output), the layer's share of the LRP relevance of the float model (``lrp``), or
   HAWQ-V2's average Hessian trace per weight of the float model's validation loss, Hutchinson
   estimate, negative noise clipped to 0 (``hessian``).
4. Allocation: the integer program (``scipy.optimize.milp``) minimising the summed importance x
   sensitivity under ``--budget`` (``w6a6``: the BOPs of every layer at 6/6; or a BOPs count).
5. Methods after the allocation: ``mixqvit`` keeps the best uniform family (re-chosen on validation
   with the allocated bits); ``mixqvit:sequential`` runs the ``sequential`` search on the allocated model.

The allocated bits stay on the run's model (the pipeline calibrates and evaluates it) and go into
``search.json`` / ``result.json`` with the BOPs, the budget and the sensitivity table.
"""

from __future__ import annotations

import time

from mnq_search.context import RunContext
from mnq_search.errors import UsageError
from mnq_search.incremental import evaluator_for

from ._registry import register_strategy
from .local import SequentialStrategy, _ValidationStrategy


def sensitivity_key(ctx: RunContext, family: str) -> dict:
    """What a bit-sensitivity table depends on: the model, its bits, the calibration and validation
    images, the methods it was measured with and the candidates."""
    st = ctx.settings
    return {"model": ctx.info.name, "checkpoint": ctx.info.checkpoint, "num_classes": st.num_classes,
            "data": str(st.data), "bits": st.bits, "nl_bits": st.nl_bits or st.bits, "fine_grid": bool(st.fine_grid),
            "post_ln": st.post_ln, "groups": st.groups, "calib_size": st.calib_size, "batch_size": st.batch_size,
            "val_size": st.val_size, "seed": st.seed, "family": family,
            "search_bits": [f"w{w}a{a}" for w, a in st.search_bits]}


def cached_bit_sensitivity(path: str | None, key: dict, measure) -> tuple[dict, float]:
    """(sensitivity table, baseline KL): read from ``path`` when it holds a table of the same ``key``,
    else ``measure()`` and write it there (``--bit-sensitivity-cache``: the importance options and
    budgets of one model share the table, which is most of mixqvit's time)."""
    import json
    from pathlib import Path

    from mnq_search.io import atomic_write_json, read_json

    def encode(table):
        return {n: {f"w{w}a{a}": v for (w, a), v in row.items()} for n, row in table.items()}

    if path and Path(path).is_file():
        data = read_json(path, "--bit-sensitivity-cache")
        if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(key)):
            raise UsageError(f"--bit-sensitivity-cache {path} was measured for other settings "
                             f"({json.dumps(data.get('key') if isinstance(data, dict) else None)[:200]}); give another file")
        from mnq_search.budget import bits_pair

        table = {n: {bits_pair(k): float(v) for k, v in row.items()} for n, row in data["sensitivity"].items()}
        return table, float(data["kl0"])
    table, kl0 = measure()
    if path:
        atomic_write_json(path, {"key": key, "kl0": kl0, "sensitivity": encode(table)})
    return table, kl0


@register_strategy("mixqvit")
class MixQViTStrategy(_ValidationStrategy):
    description = "bit-width per weight layer under --budget (sensitivity ILP), then the best uniform methods"
    free_arg = True  # mixqvit, or mixqvit:sequential

    @classmethod
    def check_arg(cls, arg: str) -> None:
        if arg != "sequential":
            raise UsageError(f"unknown argument of strategy mixqvit {arg!r}; choose from: mixqvit, mixqvit:sequential")

    def select(self, ctx: RunContext) -> dict[str, str]:
        from mnq_search.budget import bits_value
        from mnq_search.mixprec import (allocate, bit_sensitivity, bits_summary, hessian_importance, layer_relevance,
                                        set_layer_bits)
        from mnq_search.slot import bits_key

        st = ctx.settings
        if not st.budget:
            raise UsageError("--strategy mixqvit needs --budget (e.g. w6a6)")
        t = time.perf_counter()
        ev = evaluator_for(ctx)
        start, kl_start, family = self.best_uniform(ev, ctx)
        sens_family = family
        sens, kl0 = cached_bit_sensitivity(st.bit_sensitivity_cache, sensitivity_key(ctx, family),
                                           lambda: bit_sensitivity(ev, start, st.search_bits, progress=st.progress))
        importance = None
        if st.importance == "lrp":
            importance = layer_relevance(ctx.model, [x for x, _ in ctx.validation_batches(min(st.val_size, 256))])
            importance = {n: importance.get(n, 0.0) for n in sens}
        elif st.importance == "hessian":  # HAWQ-V2: Hutchinson trace per weight, noise below 0 clipped
            trace = hessian_importance(ctx.model, list(ctx.validation_batches(min(st.val_size, 256))),
                                       seed=st.seed, layers=list(sens))
            importance = {n: max(trace.get(n, 0.0), 0.0) for n in sens}
        alloc, budget = allocate(ctx.qmodel, sens, st.budget, importance)
        set_layer_bits(ctx.qmodel, alloc.choice)
        t_alloc = time.perf_counter() - t
        if self.arg == "sequential":
            seq = SequentialStrategy()
            assignment = seq.select(ctx)
            methods = {"strategy": "sequential", **{k: v for k, v in seq.info.items() if k != "trace"}}
        else:
            ev2 = evaluator_for(ctx)
            assignment, kl, family = self.best_uniform(ev2, ctx)
            methods = {"strategy": f"uniform:{family}", "kl": kl}
        self.info = {"budget": st.budget, "budget_bops": budget, "search_bits": [bits_value(w, a) for w, a in st.search_bits],
                     "importance": st.importance, "layer_importance": importance,
                     "bit_sensitivity_cache": st.bit_sensitivity_cache, "sensitivity_family": sens_family, "baseline_family": family if self.arg != "sequential" else None,
                     "kl_baseline_bits": kl0, "allocation_objective": alloc.objective, "allocation_s": round(t_alloc, 1),
                     "methods": methods, "bits": bits_summary(ctx.qmodel),
                     "sensitivity": {n: {f"w{w}a{a}": v for (w, a), v in row.items()} for n, row in sens.items()},
                     "seconds": round(time.perf_counter() - t, 1)}
        # the allocation goes into the assignment (``<layer>@bits``), so that the assignment file holds
        # it and ``eval`` reproduces the run (``b``, or ``"wXaY"`` for pairs with separate input bits)
        return {**assignment, **{bits_key(n): bits_value(w, a) for n, (w, a) in alloc.choice.items()}}
