"""Joint search with Optuna: every slot is one categorical parameter (the methods valid for its op),
and a study looks for the assignment that is best for the whole model, where the greedy rules of
the paper (section 3.2) treat layers as independent.

- Objectives (``--objective``, :class:`objectives.Objective`): ``proxy`` (KL of the logits, no
  training), ``proxy_sqnr``, ``qat`` (short QAT, top-1 on held-out training images, pruned early),
  ``cost`` (integer operations); two of them make a two-objective study whose Pareto front is
  written to ``pareto.json``.
- Warm start: the study's first trials are the uniform and greedy assignments (deduplicated;
  ``--warm-start`` picks others), so the search can only improve on them.
- Samplers ``tpe`` (default), ``gp``, ``nsga2``, ``random``, seeded by ``--seed``: with one worker
  and one thread a study is reproducible.
- Storage by URL, default ``sqlite:///OUT/study.db``; several ``mnq-search run --strategy optuna
  --storage URL --study NAME`` processes work on one study, and a killed worker's trial is retried
  (:mod:`mnq_search.search`).

An assignment that a completed trial already evaluated is not evaluated again: the trial copies
that trial's values (user attribute ``same_as``). An integer overflow in a kernel gives the
objective's worst value (user attribute ``error``).

Example:
    mnq-search run --strategy optuna --objective qat --n-trials 40 --bits 6 --out runs/optuna6
    mnq-search run --strategy optuna --objective proxy,cost --sampler nsga2 --n-trials 200
"""

from __future__ import annotations

import math
import secrets
import sys
from typing import Any

from mnq_search.errors import UsageError
from mnq_search.plan import counts
from mnq_search.slot import split_param_key
from mnq_search.search import SearchOptions, make_pruner, make_sampler
from mnq_search.search import (StudySpec, claim_budget, default_storage_url, mask_url, open_storage,
                                     open_study, parse_storage, run_worker, tally)

from mnq_search.context import RunContext

from ._base import Strategy, StrategyResult
from ._registry import get_strategy, list_strategies, register_strategy


def default_warm_starts() -> list[str]:
    """Every uniform and greedy strategy, in registry order."""
    from .greedy import GreedyStrategy
    from .uniform import UniformStrategy

    return [n for n in list_strategies() if isinstance(get_strategy(n), (UniformStrategy, GreedyStrategy))]


def warm_starts(ctx: RunContext, names: list[str] | tuple[str, ...] | None) -> list[tuple[dict, list[str]]]:
    """The assignments of the strategies or assignment files ``names`` (None: :func:`default_warm_starts`),
    identical ones merged: a list of (assignment, names). A strategy whose methods the run does not
    offer is skipped; a file's keys the space does not search are left out (its bit-widths without
    ``--joint-bits``), and a value outside a searched variable's choices is a one-line error."""
    from mnq_search.plan import load_assignment
    from mnq_search.search import is_assignment_file

    out: dict[tuple[str, ...], tuple[dict, list[str]]] = {}
    space = ctx.search_space
    for name in default_warm_starts() if names is None else names:
        if is_assignment_file(name):
            given = {k: v for k, v in load_assignment(name, ctx.slot_ops)[0].items() if k in space}
            bad = next((k for k, v in given.items() if v not in space[k].choices), None)
            if bad is not None:
                raise UsageError(f"--warm-start {name}: {given[bad]!r} is not a choice of {bad!r} in this search "
                                 f"(choose from: {', '.join(map(str, space[bad].choices))})")
            assignment = space.complete(given)
        else:
            assignment = space.complete(get_strategy(name).select(ctx))
        if any(v not in space[s].choices for s, v in assignment.items()):
            continue  # a family the run does not offer (--families)
        key = tuple(sorted((k, str(v)) for k, v in assignment.items()))
        out.setdefault(key, (assignment, []))[1].append(name)
    return list(out.values())


def suggest(trial, space) -> dict:
    """One value per variable of ``space``, a method parameter only where its slot takes its method
    (a conditional parameter, as Optuna's define-by-run spaces allow)."""
    out: dict = {}
    for var in space:
        if var.kind == "param" and out.get(var.group) != split_param_key(var.name)[1]:
            continue
        out[var.name] = trial.suggest_categorical(var.name, list(var.choices))
    return out


class _TrialFunction:
    """The study's objective: claim a place in the budget, suggest one method per slot, evaluate.
    With a BOPs budget (``limit``: the bops objective and the budget in GBOPs) every trial records its
    ``gbops`` and the constraint ``gbops - budget`` (feasible at <= 0), which Optuna's samplers and
    ``best_trials`` respect."""

    def __init__(self, ctx: RunContext, objectives: list, n_trials: int, limit: tuple[Any, float] | None = None):
        self.ctx, self.objectives, self.n_trials, self.limit = ctx, objectives, n_trials, limit

    def __call__(self, trial) -> float | list[float]:
        claim_budget(trial, self.n_trials)
        assignment = suggest(trial, self.ctx.search_space)
        if self.limit is not None:
            cost, budget = self.limit
            gbops = float(cost.evaluate(assignment, self.ctx))
            trial.set_user_attr("gbops", gbops)
            trial.set_constraint("gbops", gbops - budget)
        same = self._same_as(trial, assignment)
        if same is not None:
            trial.set_user_attr("same_as", same.number)
            return same.values[0] if len(self.objectives) == 1 else list(same.values)
        values = []
        for obj in self.objectives:
            try:
                values.append(float(obj.evaluate(assignment, self.ctx, trial)))
            except ArithmeticError as exc:  # an integer overflow in a kernel: the worst value
                trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:300])
                values.append(obj.worst)
        return values[0] if len(values) == 1 else values

    @staticmethod
    def _same_as(trial, assignment: dict[str, str]):
        from optuna.trial import TrialState

        for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            if t.number != trial.number and t.params == assignment:
                return t
        return None


def _progress(metrics: list[str]):
    def show(study, trial) -> None:
        if trial.user_attrs.get("surplus"):
            return
        vals = "" if trial.values is None else "  " + "  ".join(f"{m} {v:.5g}" for m, v in zip(metrics, trial.values))
        note = " (warm start: " + trial.user_attrs["warm_start"] + ")" if "warm_start" in trial.user_attrs else ""
        print(f"trial {trial.number:4d} {trial.state.name:8s}{vals}{note}", file=sys.stderr, flush=True)

    return show


def _sort_key(values, objectives) -> tuple[float, ...]:
    return tuple(v if o.direction == "minimize" else -v for v, o in zip(values, objectives))


def _pareto_front(trials, objectives) -> list:
    """The trials no other trial dominates (every value at least as good, one better), constraints
    not considered: the front ``pareto.json`` shows even when a budget selects within it."""
    keys = [(t, _sort_key(t.values, objectives)) for t in trials]
    return [t for t, k in keys
            if not any(all(a <= b for a, b in zip(o, k)) and o != k for _, o in keys)]


def _size_fn(ctx: RunContext):
    """A function of a trial's params giving ``{"weight_bytes": ...}``, the storage of the weight layers
    at the trial's bits (others at the model's), in a joint bits search; else one giving nothing."""
    if not ctx.search_space.variables("bits"):
        return lambda params: {}
    from mnq_search.mixprec import layer_bits, layer_params, weight_bytes
    from mnq_search.slot import layer_bit_pairs, split_layer_keys, split_slot_bits

    base, sizes = layer_bits(ctx.qmodel), layer_params(ctx.qmodel)

    def size(params: dict) -> dict[str, float]:
        layers = split_slot_bits(split_layer_keys(params)[1], ctx.slot_ops)[1]
        return {"weight_bytes": weight_bytes(sizes, {**base, **layer_bit_pairs(layers)})}

    return size


def _budget_limit(ctx: RunContext, objectives: list, opts) -> tuple[Any, float] | None:
    """(the bops objective, the budget in GBOPs) of a run with ``--budget``: the study's bops objective,
    or one set up for the constraint alone when the study optimises accuracy only."""
    if ctx.settings.budget is None:
        return None
    from objectives.bops import BopsObjective

    if "bops" in opts.objectives:
        cost = objectives[opts.objectives.index("bops")]  # set up with the study's objectives
    else:
        cost = BopsObjective()
        cost.setup(ctx)
    return cost, cost.budget(ctx.settings.budget)


@register_strategy("optuna")
class OptunaStrategy(Strategy):
    """Optuna study over every variable of the search space jointly; options from the run's
    settings (``settings.search``, :class:`~mnq_search.search.SearchOptions`). Returns the best
    assignment: of a two-objective study, the Pareto point best in the first objective (ties: the
    second)."""

    description = "joint search over all slots with an Optuna study (--objective proxy|qat|cost, warm-started)"
    needs_sensitivity = True  # the greedy warm starts

    def validation_images(self, settings) -> int:
        opts = settings.search or SearchOptions()
        return max([o.validation_images(settings) for o in opts.build_objectives()] + [0])

    def __init__(self, arg: str | None = None):
        super().__init__(arg)
        self.info: dict[str, Any] = {}
        self.front: list[dict[str, Any]] = []
        self.limit: tuple[Any, float] | None = None

    def select(self, ctx: RunContext) -> dict[str, str]:
        import optuna

        st = ctx.settings
        opts = (st.search or SearchOptions()).validate()
        objectives = opts.build_objectives()
        metrics = [o.metric for o in objectives]
        url = opts.storage or default_storage_url(st.out)
        kind, _ = parse_storage(url)
        heartbeat = opts.heartbeat if kind == "rdb" else None
        spec = StudySpec(
            name=opts.study or f"{'+'.join(opts.objectives)}-{ctx.bits}bit",
            directions=[o.direction for o in objectives], metric_names=metrics,
            meta={"objectives": list(opts.objectives), "bits": ctx.bits, "nl_bits": ctx.nl_bits,
                  "fine_grid": bool(st.fine_grid), "slot_ops": dict(ctx.slot_ops), "budget": st.budget,
                  "space": {v.name: list(v.choices) for v in ctx.search_space},
                  "model": st.model, "sampler": opts.sampler, "seed": ctx.seed},
            warm_starts=[(a, {"warm_start": "+".join(names)})
                         for a, names in warm_starts(ctx, opts.warm_start)[: opts.n_trials]])
        joiner_seed = secrets.randbelow(2**31)  # workers that join draw other points than the creator
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            storage = open_storage(url, heartbeat, opts.grace, opts.max_retry)
            study, created = open_study(storage, spec,
                                        lambda made: make_sampler(opts.sampler, ctx.seed if made else joiner_seed),
                                        make_pruner(opts.pruner) if len(objectives) == 1 else None)
            for obj in objectives:
                obj.setup(ctx)
            self.limit = _budget_limit(ctx, objectives, opts)
            callbacks = [_progress(metrics)] if st.progress else []
            run_worker(study, _TrialFunction(ctx, objectives, opts.n_trials, self.limit), opts.n_trials, opts.timeout,
                       opts.n_jobs, callbacks, storage=storage, heartbeat=heartbeat, grace=opts.grace,
                       poll_s=min(5.0, float(opts.heartbeat)))
        finally:
            optuna.logging.set_verbosity(verbosity)
        return self._choose(study, objectives, ctx, url, spec, created, None if created else joiner_seed, opts)

    def _choose(self, study, objectives, ctx, url, spec, created, joiner_seed, opts) -> dict[str, str]:
        from optuna.trial import TrialState

        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not complete:
            raise UsageError(f"study {spec.name!r} has no completed trial yet (trials: {tally(study)}); "
                             "run longer (--timeout) or check the failed trials with 'mnq-search export'")
        rank = lambda t: (_sort_key(t.values, objectives), t.number)  # noqa: E731
        front = sorted(_pareto_front(complete, objectives), key=rank)  # constraints aside: the whole front
        best = front[0]
        budget = None
        if self.limit is not None:  # the best trial (of two objectives: in the first) within the BOPs budget
            cost, budget = self.limit
            gbops = {t.number: t.user_attrs.get("gbops", None) for t in complete}
            for t in complete:  # trials of an older run of the study, without the record
                if gbops[t.number] is None:
                    gbops[t.number] = float(cost.evaluate(ctx.search_space.active(dict(t.params)), ctx))
            within = [t for t in complete if gbops[t.number] <= budget]
            if not within:
                raise UsageError(f"no trial lies within the budget {ctx.settings.budget} ({budget:.4g} GBOPs); "
                                 f"the cheapest costs {min(gbops.values()):.4g}")
            best = min(within, key=rank)
        assignment = ctx.search_space.active(dict(best.params))  # methods, their parameters, bit-widths, groups
        finite = lambda v: v if math.isfinite(v) else None  # noqa: E731 (JSON has no inf)
        size = _size_fn(ctx)
        self.front = [{"number": t.number, "values": {m: finite(v) for m, v in zip(spec.metric_names, t.values)},
                       "counts": counts(t.params, ctx.slot_ops), "slots": dict(t.params),
                       **size(t.params)} for t in front]
        self.info = {
            "storage": mask_url(url), "study": spec.name, "objectives": list(opts.objectives),
            "metrics": spec.metric_names, "directions": spec.directions, "sampler": opts.sampler,
            "pruner": opts.pruner if len(objectives) == 1 else None, "n_trials": opts.n_trials,
            "trials": tally(study), "created_by_this_worker": created,
            "sampler_seed": ctx.seed if created else joiner_seed,
            "best": {"number": best.number, "values": {m: finite(v) for m, v in zip(spec.metric_names, best.values)}},
            "warm_starts": {t.number: t.user_attrs["warm_start"] for t in study.get_trials(deepcopy=False)
                            if "warm_start" in t.user_attrs and t.system_attrs.get("failed_trial") is None},
            "pareto_size": len(front) if len(objectives) > 1 else None,
            "budget_gbops": budget,
        }
        return assignment

    def result(self, ctx: RunContext, assignment: dict[str, str]) -> StrategyResult:
        """The assignment, the study's summary (``search.json``) and, for two objectives, the
        Pareto front (``pareto.json``)."""
        pareto = None
        if len(self.info.get("objectives", ())) > 1:
            pareto = {"study": self.info["study"], "metrics": self.info["metrics"],
                      "directions": self.info["directions"], "front": self.front}
        return StrategyResult(assignment, search=self.info, pareto=pareto)
