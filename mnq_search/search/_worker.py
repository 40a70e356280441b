"""The worker loop: work on a study until it has its budget of finished trials, waiting for the
other workers' running trials and failing (so re-queueing) those whose heartbeat stopped."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ._budget import BudgetFull, _quiet_surplus, _states, tally
from ._storage import quiet_experimental

def run_worker(study, func: Callable, n_trials: int, timeout: float | None = None, n_jobs: int = 1,
               callbacks: Sequence[Callable] = (), storage=None, heartbeat: int | None = None,
               grace: int | None = None, poll_s: float = 5.0) -> dict[str, int]:
    """Work on ``study`` until it has ``n_trials`` finished trials (or ``timeout`` seconds passed).

    ``func`` must call :func:`claim_budget` first. With ``heartbeat`` (``storage`` is an RDB storage
    opened with that interval), a worker with nothing left to start waits for the other workers'
    running trials, polling every ``poll_s`` seconds and failing (so queueing again) those whose
    heartbeat stopped for ``grace`` seconds; without, it returns. A worker that died between
    creating a trial and its first heartbeat leaves a trial Optuna never finds stale: a running
    trial that stays unfailed for ``grace + 2 heartbeat`` seconds gets one heartbeat recorded here
    (harmless for a live trial, which records its own), after which it goes stale if nobody beats.
    Returns the study's trial counts per state.
    """
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    alive, done = _states()
    grace_s = float(grace or 2 * (heartbeat or 0))

    def stop_when_taken(st, _trial) -> None:
        if sum(1 for t in st.get_trials(deepcopy=False) if t.state in alive) >= n_trials:
            st.stop()

    t_end = None if timeout is None else time.monotonic() + timeout
    first_seen: dict[int, float] = {}
    nudged: set[int] = set()
    while True:
        trials = study.get_trials(deepcopy=False)
        if sum(1 for t in trials if t.state in done) >= n_trials:
            break
        left = None if t_end is None else t_end - time.monotonic()
        if left is not None and left <= 0:
            break
        waiting = any(t.state == TrialState.WAITING for t in trials)
        if waiting or sum(1 for t in trials if t.state in alive) < n_trials:
            with _quiet_surplus():
                study.optimize(func, timeout=left, n_jobs=n_jobs, catch=(BudgetFull,),
                               callbacks=[stop_when_taken, *callbacks])
            continue
        if not heartbeat:  # the others' running trials cannot be checked: leave them to their workers
            break
        time.sleep(poll_s if left is None else max(0.0, min(poll_s, left)))
        with quiet_experimental():
            fail_stale_trials(study)  # a dead worker's trial -> FAIL, queued again
        now = time.monotonic()
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in nudged and now - first_seen.setdefault(t.number, now) > grace_s + 2 * heartbeat:
                storage.record_heartbeat(t._trial_id)  # Optuna keeps the storage's trial id private
                nudged.add(t.number)
    return tally(study)
