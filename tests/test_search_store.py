"""Study storage for joint search: URLs, creation by one worker among many, the exact budget, workers
killed mid-trial and retried (PostgreSQL and the default SQLite file), export CSVs and the dashboard.

Worker tests run the real CLI (``mnq-search run --strategy optuna``, proxy objective) on the
embedded model's structure with random weights, two images, and 1 s heartbeats; the PostgreSQL
server is started by the tests (see ``tests/search_fixtures.py``) and they skip without its binaries.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
import urllib.request

import optuna
import pytest

from mnq_search.cli import main
from mnq_search.errors import UsageError
from mnq_search.search._export import compare_rows, trial_rows
from mnq_search.search import (BudgetFull, StudySpec, claim_budget, default_storage_url, mask_url,
                               open_storage, open_study, parse_storage, run_worker, storage_url)
from tests.search_fixtures import (ROOT, PostgresServer, find_pg_bin, finish, in_threads, kill_mid_trial,  # noqa: F401
                                   make_checkpoint, make_sensitivity, one_torch_thread, read_trials, start_worker,
                                   worker_cmd)

optuna.logging.set_verbosity(optuna.logging.WARNING)
SLOT_OPS = {"blocks.0.attn.softmax": "softmax", "blocks.0.mlp.act": "gelu", "blocks.0.norm1": "layernorm"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("search")
    return make_checkpoint(d / "tiny.safetensors"), make_sensitivity(d / "sensitivity.csv")


@pytest.fixture(scope="module")
def postgres():
    bin_dir = find_pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (Debian package postgresql-15; or set MNQ_PG_BIN)")
    server = PostgresServer(bin_dir).start()
    yield server
    server.stop()


def _spec(name="s", warm=()):
    return StudySpec(name=name, directions=["minimize"], metric_names=["x"],
                     meta={"objectives": ["toy"], "bits": 8, "slot_ops": SLOT_OPS},
                     warm_starts=[(w, {"warm_start": f"w{i}"}) for i, w in enumerate(warm)])


def _toy(n_trials, sleep=0.0):
    """A study objective over SLOT_OPS with the budget claim, as the optuna strategy's."""
    def fn(trial):
        claim_budget(trial, n_trials)
        params = {s: trial.suggest_categorical(s, ["ibert", "ivit"]) for s in SLOT_OPS}
        time.sleep(sleep)
        return sum(m == "ivit" for m in params.values()) + trial.number * 1e-3
    return fn


# --- URLs and creation ---------------------------------------------------------------------------

def test_storage_urls(tmp_path):
    assert default_storage_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/study.db"
    assert parse_storage("journal:/x/j.log") == ("journal", "/x/j.log")
    assert parse_storage("postgresql+psycopg2://u:secret@h:5/db")[0] == "rdb"
    assert "secret" not in mask_url("postgresql+psycopg2://u:secret@h:5/db")
    with pytest.raises(UsageError, match="bad storage URL"):
        parse_storage("sqlite//nope")
    with pytest.raises(UsageError, match="neither a URL"):
        storage_url(str(tmp_path / "missing.db"))
    open_storage(f"sqlite:///{tmp_path / 'a.db'}")  # makes the file
    assert storage_url(str(tmp_path / "a.db")) == f"sqlite:///{(tmp_path / 'a.db').resolve()}"
    (tmp_path / "j.log").write_text("")
    assert storage_url(str(tmp_path / "j.log")) == f"journal:{tmp_path / 'j.log'}"
    with pytest.raises(UsageError, match="SQLite file not found"):
        open_storage(f"sqlite:///{tmp_path / 'none.db'}", create=False)


def test_one_creator_enqueues_the_warm_starts_once(tmp_path):
    """Four workers open a new storage and one study at once: one creates the study (and enqueues
    the warm starts), the others join it."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    warm = [{s: "ibert" for s in SLOT_OPS}, {s: "ivit" for s in SLOT_OPS}]
    created = []
    errors = in_threads(lambda _: created.append(open_study(open_storage(url), _spec(warm=warm), lambda c: None)[1]), 4)
    assert not errors and sorted(created) == [False, False, False, True]
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.system_attrs["fixed_params"] for t in trials] == warm


def test_joining_a_study_made_for_other_settings_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_study(open_storage(url), _spec(), lambda c: None)
    other = _spec()
    other.meta = dict(other.meta, bits=6)
    with pytest.raises(UsageError, match="made for bits 8"):
        open_study(open_storage(url), other, lambda c: None)


def test_threads_and_workers_share_an_exact_budget(tmp_path):
    """Three workers (two threads each) on one study: exactly n finished trials, warm starts once."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    open_storage(url)
    warm = [{s: "ibert" for s in SLOT_OPS}]
    n = 12

    def worker(seed):
        storage = open_storage(url, heartbeat=1)
        study, _ = open_study(storage, _spec(warm=warm), lambda c: optuna.samplers.RandomSampler(seed=seed))
        run_worker(study, _toy(n, sleep=0.02), n, n_jobs=2, storage=storage, heartbeat=1, poll_s=0.2)

    assert not in_threads(worker, 3)
    trials = optuna.load_study(study_name="s", storage=url).trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n
    assert all(t.user_attrs.get("surplus") and not t.params for t in trials if t.state.name != "COMPLETE")
    assert sum(t.user_attrs.get("warm_start") == "w0" for t in complete) == 1 and complete[0].number == 0


def test_a_surplus_trial_evaluates_nothing_and_stops_its_worker():
    study = optuna.create_study()
    study.optimize(lambda t: 0.0, n_trials=2)
    calls = []

    def fn(trial):
        claim_budget(trial, 2)
        calls.append(trial.number)
        return trial.suggest_float("x", 0, 1)

    study.optimize(fn, n_trials=5, catch=(BudgetFull,))
    assert calls == [] and len(study.trials) == 3  # one surplus trial, then the worker stopped
    assert study.trials[2].state.name == "FAIL" and study.trials[2].user_attrs["surplus"]
    assert study.trials[2].params == {}


def test_postgres_workers_create_the_tables_at_once(postgres):
    """Workers opening a fresh PostgreSQL database at once race to create Optuna's tables."""
    url = postgres.database("tables_race")
    warm = [{s: "ivit" for s in SLOT_OPS}]
    assert not in_threads(lambda _: open_study(open_storage(url, heartbeat=1), _spec(warm=warm), lambda c: None), 4)
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 1


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_left_before_its_first_heartbeat_is_retried(tmp_path):
    """A worker that dies right after creating a trial leaves it RUNNING with no heartbeat, which
    Optuna never finds stale; the next worker gives it one heartbeat, then fails and retries it."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    storage = open_storage(url, heartbeat=1, grace=1)
    study, _ = open_study(storage, _spec(warm=[{s: "ivit" for s in SLOT_OPS}]), lambda c: None)
    dead = study.ask()  # popped the warm start; its worker "dies" here
    t0 = time.monotonic()
    run_worker(study, _toy(2), 2, storage=storage, heartbeat=1, grace=1, poll_s=0.2)
    trials = study.trials
    assert trials[dead.number].state.name == "FAIL" and time.monotonic() - t0 < 30
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == {s: "ivit" for s in SLOT_OPS}
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2


# --- workers killed mid-trial (real CLI processes) -----------------------------------------------

def _check_retried(trials, killed, n):
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n, [(t.number, t.state.name) for t in trials]
    assert trials[killed].state.name == "FAIL"
    retries = [t for t in complete if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1
    # the retry keeps what the killed trial had chosen (all slots, unless killed while choosing)
    assert trials[killed].params.items() <= retries[0].params.items()
    assert trials[0].state.name == "COMPLETE"  # finished before the kill: kept


@pytest.mark.slow
def test_postgres_two_workers_one_study(postgres, files, tmp_path):
    ckpt, sens = files
    url = postgres.database("two_workers")
    args = ["--storage", url, "--study", "shared", "--n-trials", "4", "--warm-start", "uniform:ibert,uniform:ivit"]
    procs = [(start_worker(worker_cmd(ckpt, sens, tmp_path / f"w{i}", *args), tmp_path / f"w{i}.log"),
              tmp_path / f"w{i}.log") for i in range(2)]
    for proc, log in procs:
        finish(proc, log)
    trials = read_trials(url, "shared")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    assert all(t.user_attrs.get("surplus") and not t.params for t in trials if t.state.name != "COMPLETE")
    assert [t.user_attrs.get("warm_start") for t in complete[:2]] == ["uniform:ibert", "uniform:ivit"]
    assert len({json.dumps(t.params, sort_keys=True) for t in complete[:2]}) == 2
    infos = [json.loads((tmp_path / f"w{i}" / "search.json").read_text()) for i in range(2)]
    assert sorted(i["created_by_this_worker"] for i in infos) == [False, True]
    assert infos[0]["best"] == infos[1]["best"]  # both saw the whole study


@pytest.mark.slow
def test_postgres_worker_killed_mid_trial_is_retried(postgres, files, tmp_path):
    ckpt, sens = files
    url = postgres.database("killed")
    cmd = worker_cmd(ckpt, sens, tmp_path / "w", "--storage", url, "--study", "k", "--n-trials", "2",
                     "--warm-start", "uniform:ivit")
    killed = kill_mid_trial(start_worker(cmd, tmp_path / "a.log"), url, "k", tmp_path / "a.log")
    finish(start_worker(cmd, tmp_path / "b.log"), tmp_path / "b.log")
    _check_retried(read_trials(url, "k"), killed, 2)


@pytest.mark.slow
def test_sqlite_default_resume_after_kill(files, tmp_path):
    """One process, the default storage (sqlite:///OUT/study.db): killed mid-trial, run again."""
    ckpt, sens = files
    out = tmp_path / "run"
    cmd = worker_cmd(ckpt, sens, out, "--n-trials", "2", "--warm-start", "uniform:ivit")
    url = default_storage_url(out)
    killed = kill_mid_trial(start_worker(cmd, tmp_path / "a.log"), url, "proxy-8bit", tmp_path / "a.log")
    assert not (out / "result.json").exists()
    finish(start_worker(cmd, tmp_path / "b.log"), tmp_path / "b.log")
    _check_retried(read_trials(url, "proxy-8bit"), killed, 2)
    assert json.loads((out / "search.json").read_text())["trials"] == {"COMPLETE": 2, "FAIL": 1}


# --- export and dashboard ------------------------------------------------------------------------

def _toy_study(tmp_path, name="toy", n=5):
    url = f"sqlite:///{tmp_path / 'toy.db'}"
    study, _ = open_study(open_storage(url), _spec(name, warm=[{s: "ivit" for s in SLOT_OPS}]),
                          lambda c: optuna.samplers.RandomSampler(seed=0))
    run_worker(study, _toy(n), n)
    return url, study


def test_export_trials_csv(tmp_path, capsys):
    url, study = _toy_study(tmp_path)
    out = tmp_path / "trials.csv"
    assert main(["export", "--storage", url, "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [int(r["number"]) for r in rows] == [0, 1, 2, 3, 4] and {r["state"] for r in rows} == {"COMPLETE"}
    assert rows[0]["warm_start"] == "w0" and float(rows[0]["value_x"]) == pytest.approx(3.0)
    assert int(rows[0]["softmax_ivit"]) == 1 and int(rows[0]["gelu_ivit"]) == 1 and int(rows[0]["layernorm_ibert"]) == 0
    assert json.loads(rows[2]["assignment"]) == study.trials[2].params
    fields, _ = trial_rows(study)
    assert fields[:3] == ["number", "state", "value_x"] and fields[-1] == "assignment"
    # the file path works as --storage too; a missing study is a one-line error
    assert main(["export", "--storage", str(tmp_path / "toy.db"), "--csv", str(out)]) == 0
    assert main(["export", "--storage", url, "--study", "nope", "--csv", str(out)]) == 2
    assert "unknown study 'nope'" in capsys.readouterr().err


def test_export_compare_csv(tmp_path, capsys):
    def result(folder, strategy, top1, bits=8):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "result.json").write_text(json.dumps({
            "strategy": strategy, "model": "m", "bits": bits, "seed": 0, "top1_fp": 80.0, "top1_quant": top1,
            "counts": {"softmax": {"ibert": 12, "fqvit": 0, "ivit": 0}, "gelu": {"ibert": 12, "ivit": 0},
                       "layernorm": {"ibert": 25, "fqvit": 0, "ivit": 0}}}))

    result("b/optuna", "optuna", 71.0)
    result("a/diff", "sqnr_diff", 70.0)
    result("c/six", "sqnr_diff", 60.0, bits=6)
    (tmp_path / "qat").mkdir()
    (tmp_path / "qat" / "result.json").write_text(json.dumps({"top1_qat": 1.0}))  # not a run: skipped
    rows = compare_rows(tmp_path)
    assert [(r["bits"], r["strategy"]) for r in rows] == [(6, "sqnr_diff"), (8, "optuna"), (8, "sqnr_diff")]
    assert rows[1]["softmax_ibert"] == 12 and rows[1]["folder"] == "b/optuna"
    assert main(["export", "--compare", str(tmp_path), "--csv", str(tmp_path / "cmp.csv")]) == 0
    assert len(list(csv.DictReader((tmp_path / "cmp.csv").open()))) == 3
    assert main(["export", "--compare", str(tmp_path / "qat"), "--csv", str(tmp_path / "x.csv")]) == 2
    assert "no run results" in capsys.readouterr().err


def test_dashboard_serves_the_study(tmp_path):
    url, study = _toy_study(tmp_path, name="dash", n=3)
    proc = subprocess.Popen([sys.executable, "-m", "mnq_search.cli", "dashboard", "--storage", url, "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        address = proc.stdout.readline().strip()
        assert address.startswith("http://127.0.0.1:"), address
        with urllib.request.urlopen(f"{address}/api/studies", timeout=30) as r:
            summaries = json.loads(r.read())["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["dash"]
        with urllib.request.urlopen(f"{address}/api/studies/{summaries[0]['study_id']}", timeout=30) as r:
            detail = json.loads(r.read())
        assert [t["number"] for t in detail["trials"]] == [0, 1, 2]
    finally:
        proc.terminate()
        proc.wait(30)


def test_sqlite_threads_never_start_a_queued_trial_twice(tmp_path):
    """Eight threads over 40 queued trials: each runs once. Without the storage's lock SQLite lets
    two threads start the same WAITING trial (measured: 5 of 5 such studies broke, 'Cannot tell a
    COMPLETE trial')."""
    for rep in range(2):
        study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / f'{rep}.db'}"), study_name="q")
        for i in range(40):
            study.enqueue_trial({"a": i})
        seen: list[int] = []

        def objective(trial):
            seen.append(trial.suggest_int("a", 0, 100))
            time.sleep(0.01)
            return 0.0

        study.optimize(objective, n_trials=40, n_jobs=8)
        assert sorted(seen) == list(range(40))
        assert [t.state.name for t in study.trials].count("COMPLETE") == 40
