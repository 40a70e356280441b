"""Where studies live: storage URLs and opening a storage (SQLite, PostgreSQL/MySQL, journal file).

Storage by URL: any Optuna RDB URL (``sqlite:///DIR/study.db``, the default in the run folder;
``postgresql+psycopg2://user@host:port/db``; MySQL) or ``journal:PATH`` (a journal file, for file
systems without reliable locks). RDB storages record a heartbeat of every running trial; a trial
whose worker died (no heartbeat for ``grace`` seconds) is marked FAIL by the next worker that asks
for a trial, and queued again with the same parameters (Optuna's
``RetryHeartbeatStaleTrialCallback``). Journal storages have no heartbeat in Optuna: a killed
worker's trial stays RUNNING there.
"""

from __future__ import annotations

import random
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..errors import UsageError

if TYPE_CHECKING:
    import optuna

JOURNAL_PREFIX = "journal:"
SQLITE_HEADER = b"SQLite format 3\x00"
CREATE_TABLE_TRIES = 5

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
