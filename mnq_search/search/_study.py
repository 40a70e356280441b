"""How workers share one study: it is created once (metadata, metric names and the warm starts
enqueued exactly once, by the worker whose ``create_study`` succeeds) and joined by the others, who
wait for it to be ready and check that it was made for the same search."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ._storage import quiet_experimental

if TYPE_CHECKING:
    import optuna

READY_ATTR = "mnq_search_ready"
META_ATTR = "mnq_search"
READY_WAIT_S = 120.0  # how long a joining worker waits for the creator to set the study up
META_KEYS = ("objectives", "bits", "nl_bits", "fine_grid", "slot_ops", "budget", "space")  # what a joining worker must agree on
SINCE = {"space"}  # keys older studies do not have: checked only where the study records them


@dataclass
class StudySpec:
    """What a study is made of. ``meta`` is stored as the study's user attribute ``mnq_search``
    (``objectives``, ``bits`` and ``slot_ops`` must match for a worker to join);
    ``warm_starts`` are (params, user_attrs) enqueued, in order, by the worker that creates it."""

    name: str
    directions: list[str]
    metric_names: list[str]
    meta: dict[str, Any]
    warm_starts: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)


def open_study(storage, spec: StudySpec, sampler_for: Callable[[bool], Any], pruner=None,
               ready_wait_s: float = READY_WAIT_S) -> tuple["optuna.Study", bool]:
    """Create the study, or join it if another worker made it; returns (study, created).

    Only the worker whose ``create_study`` succeeds sets the metric names and metadata and
    enqueues the warm starts (so they are trials 0, 1, ... and exist once), then marks the study
    ready; a joining worker waits for that mark before it asks for a trial. ``sampler_for(created)``
    builds the sampler (the creator seeds it with the run's seed).
    """
    import optuna
    from optuna.exceptions import DuplicatedStudyError

    try:
        study = optuna.create_study(storage=storage, study_name=spec.name, directions=spec.directions,
                                    sampler=sampler_for(True), pruner=pruner, load_if_exists=False)
    except DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage, sampler=sampler_for(False), pruner=pruner)
        _wait_ready(study, ready_wait_s)
        _check_compatible(study, spec)
        return study, False
    with quiet_experimental():
        study.set_metric_names(spec.metric_names)
    study.set_user_attr(META_ATTR, spec.meta)
    for params, attrs in spec.warm_starts:
        study.enqueue_trial(params, user_attrs=attrs)
    study.set_user_attr(READY_ATTR, True)
    return study, True


def _wait_ready(study, wait_s: float) -> None:
    t_end = time.monotonic() + wait_s
    while not study.user_attrs.get(READY_ATTR):
        if time.monotonic() > t_end:
            raise UsageError(f"study {study.study_name!r} exists but was never set up (its creator stopped "
                             f"within {wait_s:.0f} s?); delete it or use another --study")
        time.sleep(0.2)


def _check_compatible(study, spec: StudySpec) -> None:
    theirs = study.user_attrs.get(META_ATTR, {})
    for key in META_KEYS:
        if key in SINCE and key not in theirs:
            continue
        if theirs.get(key) != spec.meta.get(key):
            what = {"slot_ops": "the model's slots", "space": "another search space (variables or their choices)"}.get(
                key, f"{key} {theirs.get(key)!r}")
            raise UsageError(f"study {study.study_name!r} was made for {what}, not this run's "
                             f"({ {'slot_ops': 'other slots', 'space': 'its own'}.get(key, spec.meta.get(key))}): "
                             "use another --study or --storage")
    directions = [d.name.lower() for d in study.directions]
    if directions != spec.directions:
        raise UsageError(f"study {study.study_name!r} has directions {directions}, this run {spec.directions}")


def study_meta(study) -> Mapping[str, Any]:
    return study.user_attrs.get(META_ATTR, {})
