"""An exact trial budget across any number of workers.

``n_trials`` is the number of trials the study finishes (COMPLETE or PRUNED). A trial may start only
if fewer than ``n_trials`` trials that are finished, running or queued precede it (trial numbers are
given out under a lock by the storage); otherwise it ends at once as FAIL with the user attribute
``surplus`` (no parameters, nothing evaluated) and its worker stops.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

class BudgetFull(Exception):
    """The study's budget is taken by earlier trials: this trial is surplus and evaluates nothing."""


def _states():
    from optuna.trial import TrialState

    alive = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return alive, (TrialState.COMPLETE, TrialState.PRUNED)


def tally(study) -> dict[str, int]:
    """Trials per state name."""
    return dict(Counter(t.state.name for t in study.get_trials(deepcopy=False)))


def claim_budget(trial, n_trials: int) -> None:
    """Raise :class:`BudgetFull` (after marking the trial ``surplus`` and stopping this worker's
    loop) if ``n_trials`` finished, running or queued trials precede ``trial``."""
    alive, _ = _states()
    before = sum(1 for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number and t.state in alive)
    if before >= n_trials:
        trial.set_user_attr("surplus", True)
        trial.study.stop()
        _SURPLUS.numbers.add(trial.number)
        raise BudgetFull(f"trial {trial.number}: the study's {n_trials} trials are all taken")


class _SurplusFilter(logging.Filter):
    """Drops Optuna's "Trial N failed" warnings for surplus trials (they are expected)."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers: set[int] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(msg.startswith(f"Trial {n} failed") for n in self.numbers)


_SURPLUS = _SurplusFilter()


@contextmanager
def _quiet_surplus() -> Iterator[None]:
    logger = logging.getLogger("optuna.study._optimize")
    logger.addFilter(_SURPLUS)
    try:
        yield
    finally:
        logger.removeFilter(_SURPLUS)
