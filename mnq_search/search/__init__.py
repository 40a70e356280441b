"""Joint search with Optuna, the machinery under ``--strategy optuna``: typed options, samplers and
pruners by name, storages, a study shared by many workers with an exact trial budget, the worker
loop, and the export of trials and runs as CSV (and a dashboard).

- :mod:`._options`: :class:`SearchOptions`, validated once;
- :mod:`._samplers`: sampler and pruner registries;
- :mod:`._storage`: storage URLs, opening SQLite / PostgreSQL / journal storages;
- :mod:`._study`: creating or joining a study (warm starts enqueued once);
- :mod:`._budget`: the exact budget across workers;
- :mod:`._worker`: the loop a worker runs (heartbeats, retries of dead workers' trials);
- :mod:`._export`, :mod:`._dashboard`: ``mnq-search export`` and ``mnq-search dashboard``.
"""

from ._budget import BudgetFull as BudgetFull
from ._budget import claim_budget as claim_budget
from ._budget import tally as tally
from ._options import SearchOptions as SearchOptions
from ._options import is_assignment_file as is_assignment_file
from ._options import split_names as split_names
from ._samplers import list_pruners as list_pruners
from ._samplers import list_samplers as list_samplers
from ._samplers import make_pruner as make_pruner
from ._samplers import make_sampler as make_sampler
from ._samplers import register_pruner as register_pruner
from ._samplers import register_sampler as register_sampler
from ._storage import default_storage_url as default_storage_url
from ._storage import mask_url as mask_url
from ._storage import open_storage as open_storage
from ._storage import parse_storage as parse_storage
from ._storage import quiet_experimental as quiet_experimental
from ._storage import storage_url as storage_url
from ._study import StudySpec as StudySpec
from ._study import open_study as open_study
from ._study import study_meta as study_meta
from ._worker import run_worker as run_worker

__all__ = ["BudgetFull", "SearchOptions", "StudySpec", "claim_budget", "default_storage_url", "list_pruners",
           "list_samplers", "make_pruner", "make_sampler", "mask_url", "open_storage", "open_study", "parse_storage",
           "quiet_experimental", "register_pruner", "register_sampler", "run_worker", "split_names", "storage_url",
           "study_meta", "tally"]
