"""Where studies live and how workers share one: storage URLs, study creation (the warm starts
enqueued exactly once), heartbeats and retries, and an exact trial budget across workers.

Storage by URL: any Optuna RDB URL (``sqlite:///DIR/study.db``, the default in the run folder;
``postgresql+psycopg2://user@host:port/db``; MySQL) or ``journal:PATH`` (a journal file, for file
systems without reliable locks). RDB storages record a heartbeat of every running trial; a trial
whose worker died (no heartbeat for ``grace`` seconds) is marked FAIL by the next worker that asks
for a trial, and queued again with the same parameters (Optuna's
``RetryHeartbeatStaleTrialCallback``). Journal storages have no heartbeat in Optuna: a killed
worker's trial stays RUNNING there.

The budget is exact with any number of workers: ``n_trials`` is the number of trials the study
finishes (COMPLETE or PRUNED). A trial may start only if fewer than ``n_trials`` trials that are
finished, running or queued precede it (trial numbers are given out under a lock by the storage);
otherwise it ends at once as FAIL with the user attribute ``surplus`` (no parameters, nothing
evaluated) and its worker stops. A worker returns only when the study is complete (or its
``timeout`` is over): it waits for the trials other workers are running, and fails and retries
those whose heartbeat stopped.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .errors import UsageError

if TYPE_CHECKING:
    import optuna

JOURNAL_PREFIX = "journal:"
SQLITE_HEADER = b"SQLite format 3\x00"
READY_ATTR = "mnq_search_ready"
META_ATTR = "mnq_search"
CREATE_TABLE_TRIES = 5
READY_WAIT_S = 120.0  # how long a joining worker waits for the creator to set the study up
META_KEYS = ("objectives", "bits", "fine_grid", "slot_ops")  # what a joining worker must agree on


_WARNINGS_LOCK = threading.RLock()


@contextmanager
def quiet_experimental() -> Iterator[None]:
    """Silence Optuna's ExperimentalWarning (heartbeats, retries, metric names, multivariate TPE)
    in a block; one block at a time, since ``warnings.catch_warnings`` is process-wide."""
    from optuna.exceptions import ExperimentalWarning

    with _WARNINGS_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield


# --- URLs ------------------------------------------------------------------------------------

def default_storage_url(out: str | Path) -> str:
    """``sqlite:///OUT/study.db`` (absolute path)."""
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def storage_url(text: str) -> str:
    """A storage URL from what a user typed: a URL, ``journal:PATH``, or the path of an existing
    SQLite or journal file."""
    if "://" in text or text.startswith(JOURNAL_PREFIX):
        return text
    path = Path(text)
    if path.is_file():
        with path.open("rb") as fh:
            header = fh.read(len(SQLITE_HEADER))
        return f"sqlite:///{path.resolve()}" if header == SQLITE_HEADER else f"{JOURNAL_PREFIX}{path}"
    raise UsageError(f"storage {text!r} is neither a URL (e.g. sqlite:///runs/x/study.db, "
                     "postgresql+psycopg2://user@host/db, journal:PATH) nor an existing file")


def parse_storage(url: str) -> tuple[str, str]:
    """``("journal", path)`` or ``("rdb", url)``; a one-line UsageError for anything else."""
    if url.startswith(JOURNAL_PREFIX):
        path = url[len(JOURNAL_PREFIX):]
        if not path:
            raise UsageError("journal storage needs a file: journal:PATH")
        return "journal", path
    import sqlalchemy

    try:
        sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise UsageError(f"bad storage URL {url!r}; e.g. sqlite:///runs/x/study.db, "
                         "postgresql+psycopg2://user@host:5432/db or journal:PATH") from None
    return "rdb", url


def mask_url(url: str) -> str:
    """The URL with its password hidden (for logs and result files)."""
    kind, _ = parse_storage(url)
    if kind == "journal":
        return url
    import sqlalchemy

    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


_SQLITE_LOCKS: dict[str, threading.Lock] = {}


def _serialize_state_changes(storage, database: str) -> None:
    """SQLite ignores Optuna's ``SELECT ... FOR UPDATE``: two threads (``--n-jobs``) can both read a
    queued trial as WAITING and both start it, one then failing to finish it. Changing a trial's
    state under one lock per database file makes the read and the write one step for all of this
    process's threads (workers in other processes need PostgreSQL, which locks the row)."""
    lock = _SQLITE_LOCKS.setdefault(str(Path(database).resolve()) if database != ":memory:" else database,
                                    threading.Lock())
    unlocked = storage.set_trial_state_values

    def set_trial_state_values(trial_id, state, values=None):
        with lock:
            return unlocked(trial_id, state, values)

    storage.set_trial_state_values = set_trial_state_values


def open_storage(url: str, heartbeat: int | None = None, grace: int | None = None,
                 max_retry: int | None = 3, create: bool = True) -> "optuna.storages.BaseStorage":
    """Open the storage at ``url``; for RDB URLs with ``heartbeat``, failed-by-heartbeat trials are
    queued again (up to ``max_retry`` times). ``create=False``: a SQLite or journal file must exist."""
    import optuna
    import sqlalchemy

    kind, where = parse_storage(url)
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        if not create and not Path(where).is_file():
            raise UsageError(f"journal file not found: {where}")
        Path(where).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(where))
    parsed = sqlalchemy.engine.make_url(url)
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": 60}  # several threads or processes wait for the lock
        if parsed.database and parsed.database != ":memory:":
            if not create and not Path(parsed.database).is_file():
                raise UsageError(f"SQLite file not found: {parsed.database}")
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    with quiet_experimental():  # heartbeats and retries are experimental in Optuna 5
        kwargs: dict[str, Any] = {}
        if heartbeat:
            retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry)
            kwargs = dict(heartbeat_interval=heartbeat, grace_period=grace, heartbeat_stale_trial_callback=retry)
        for attempt in range(CREATE_TABLE_TRIES):
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
                if parsed.get_backend_name() == "sqlite":
                    _serialize_state_changes(storage, parsed.database or ":memory:")
                return storage
            except ImportError as exc:
                raise UsageError(f"cannot open storage {mask_url(url)}: {exc} (PostgreSQL needs psycopg2-binary)") from None
            except sqlalchemy.exc.SQLAlchemyError as exc:
                # workers that open a new database at once race to create Optuna's tables (a unique
                # violation in the catalog, "already exists", a deadlock): the loser tries again
                racing = isinstance(exc, (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError,
                                          sqlalchemy.exc.InternalError)) \
                    or any(w in str(exc).lower() for w in ("deadlock", "already exists"))
                if not racing or attempt == CREATE_TABLE_TRIES - 1:
                    first = str(exc).strip().splitlines()[0][:200]
                    raise UsageError(f"cannot open storage {mask_url(url)}: {first}") from None
                time.sleep(0.2 + random.random())
    raise AssertionError("not reached")


# --- study creation --------------------------------------------------------------------------

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
        if theirs.get(key) != spec.meta.get(key):
            what = "the model's slots" if key == "slot_ops" else f"{key} {theirs.get(key)!r}"
            raise UsageError(f"study {study.study_name!r} was made for {what}, not this run's "
                             f"({spec.meta.get(key) if key != 'slot_ops' else 'other slots'}): "
                             "use another --study or --storage")
    directions = [d.name.lower() for d in study.directions]
    if directions != spec.directions:
        raise UsageError(f"study {study.study_name!r} has directions {directions}, this run {spec.directions}")


# --- the budget across workers ---------------------------------------------------------------

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


def study_meta(study) -> Mapping[str, Any]:
    return study.user_attrs.get(META_ATTR, {})
