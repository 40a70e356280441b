"""Options of a joint search (``mnq-search run --strategy optuna``), samplers and pruners by name.

The options travel as a plain dict in ``RunConfig.extra["optuna"]`` (the CLI's "search" group);
:meth:`SearchOptions.from_dict` rebuilds and :meth:`SearchOptions.validate` checks them, both
before any model is loaded (the CLI) and again in the strategy.

Samplers (all seeded): ``tpe`` (multivariate TPE, the default), ``gp`` (Gaussian process),
``nsga2`` (genetic; suits two-objective studies), ``random``. Pruners: ``median``,
``halving`` (successive halving), ``none``; only objectives that report intermediate values
(``qat``) in a one-objective study are pruned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import UsageError, unknown_choice

SAMPLERS = ("tpe", "gp", "nsga2", "random")
PRUNERS = ("median", "halving", "none")
MAX_OBJECTIVES = 2


@dataclass
class SearchOptions:
    n_trials: int = 50  # finished (complete or pruned) trials of the study, all workers together
    timeout: float | None = None  # seconds for this worker
    n_jobs: int = 1  # threads of this worker
    objectives: tuple[str, ...] = ("proxy",)
    sampler: str = "tpe"
    pruner: str = "median"
    storage: str | None = None  # None: sqlite:///OUT/study.db
    study: str | None = None  # None: "<objectives>-<bits>bit"
    warm_start: tuple[str, ...] | None = None  # None: every uniform and greedy strategy; (): none
    heartbeat: int = 60  # seconds between heartbeats of a running trial (RDB storages)
    grace: int | None = None  # seconds without heartbeat before a trial is failed (None: 2 x heartbeat)
    max_retry: int = 3  # times a trial failed by heartbeat is queued again
    qat_steps: int = 100
    qat_holdout: int = 2000
    qat_eval_every: int | None = None
    cost_table: str | None = None

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SearchOptions":
        names = {f.name for f in dataclasses.fields(cls)}
        d = dict(d or {})
        unknown = sorted(set(d) - names)
        if unknown:
            raise UsageError(f"unknown search option {unknown[0]!r}; choose from: {', '.join(sorted(names))}")
        for key in ("objectives", "warm_start"):
            if isinstance(d.get(key), str):
                d[key] = split_names(d[key])
            elif d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> "SearchOptions":
        """Raise a one-line UsageError for a bad value; builds every objective once (a bad cost
        table fails here)."""
        for name, value, low in (("--n-trials", self.n_trials, 1), ("--n-jobs", self.n_jobs, 1),
                                 ("--heartbeat", self.heartbeat, 1), ("--max-retry", self.max_retry, 0)):
            if not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.grace is not None and (not isinstance(self.grace, int) or self.grace < 1):
            raise UsageError(f"--grace must be an integer >= 1, got {self.grace!r}")
        if self.timeout is not None and not self.timeout > 0:
            raise UsageError(f"--timeout must be positive, got {self.timeout}")
        if self.sampler not in SAMPLERS:
            raise unknown_choice("sampler", self.sampler, SAMPLERS)
        if self.pruner not in PRUNERS:
            raise unknown_choice("pruner", self.pruner, PRUNERS)
        if not self.objectives or len(self.objectives) > MAX_OBJECTIVES:
            raise UsageError(f"--objective takes one or two objectives (e.g. qat or qat,cost), got {len(self.objectives)}")
        if len(set(self.objectives)) != len(self.objectives):
            raise UsageError(f"--objective names an objective twice: {','.join(self.objectives)}")
        self.build_objectives()
        if self.warm_start:
            from strategies import get_strategy

            for name in self.warm_start:
                if name.partition(":")[0] == "optuna":
                    raise UsageError("--warm-start cannot name the optuna strategy itself")
                get_strategy(name)
        if self.storage is not None:
            from .search_store import parse_storage

            parse_storage(self.storage)
        return self

    def build_objectives(self) -> list:
        """The objectives, by name from the registry (:class:`objectives.Objective` subclasses)."""
        from objectives import Objective, get_objective

        return [get_objective(name, Objective).from_options(self) for name in self.objectives]


def split_names(text: str) -> tuple[str, ...]:
    """``"qat, cost"`` -> ``("qat", "cost")``; ``"none"`` -> ``()``."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    return () if names == ("none",) else names


def make_sampler(name: str, seed: int | None):
    """A seeded Optuna sampler by name (see :data:`SAMPLERS`)."""
    import optuna

    from .search_store import quiet_experimental

    with quiet_experimental():
        if name == "tpe":  # multivariate: the slots are searched jointly, not one by one
            return optuna.samplers.TPESampler(seed=seed, multivariate=True)
        if name == "gp":
            return optuna.samplers.GPSampler(seed=seed)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed)
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
    raise unknown_choice("sampler", name, SAMPLERS)


def make_pruner(name: str):
    """An Optuna pruner by name (see :data:`PRUNERS`)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    raise unknown_choice("pruner", name, PRUNERS)
