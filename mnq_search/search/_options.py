"""Options of a joint search (``mnq-search run --strategy optuna``): one typed object, built and
validated once from the CLI's "search" group before any model is loaded, and handed to the
strategy through the run context."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError, unknown_choice
from ._samplers import list_pruners, list_samplers

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
    warm_start: tuple[str, ...] | None = None  # strategies or assignment files (*.json); None: every uniform and greedy strategy; (): none
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
        if self.sampler not in list_samplers():
            raise unknown_choice("sampler", self.sampler, list_samplers())
        if self.pruner not in list_pruners():
            raise unknown_choice("pruner", self.pruner, list_pruners())
        if not self.objectives or len(self.objectives) > MAX_OBJECTIVES:
            raise UsageError(f"--objective takes one or two objectives (e.g. qat or qat,cost), got {len(self.objectives)}")
        if len(set(self.objectives)) != len(self.objectives):
            raise UsageError(f"--objective names an objective twice: {','.join(self.objectives)}")
        self.build_objectives()
        if self.warm_start:
            from strategies import get_strategy

            for name in self.warm_start:
                if is_assignment_file(name):
                    from mnq_search.preflight import check_input_file

                    check_input_file(name, "--warm-start")
                    continue
                if name.partition(":")[0] == "optuna":
                    raise UsageError("--warm-start cannot name the optuna strategy itself")
                get_strategy(name)
        if self.storage is not None:
            from ._storage import parse_storage

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


def is_assignment_file(name: str) -> bool:
    """Whether a ``--warm-start`` entry names an assignment file (``*.json``) rather than a strategy."""
    return name.lower().endswith(".json")
