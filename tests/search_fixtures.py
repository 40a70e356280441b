"""Helpers of the joint-search tests: a tiny checkpoint, a synthetic sensitivity table, search
workers run as real CLI processes, and a throw-away PostgreSQL server on loopback.

The PostgreSQL server comes from the Debian package ``postgresql-15`` (any version under
``/usr/lib/postgresql/*/bin``, or ``$MNQ_PG_BIN``). Postgres refuses to run as root, so under root
``initdb`` and ``pg_ctl`` run as the ``postgres`` system user (``runuser``), in a temporary folder
that user owns; the server listens on 127.0.0.1 on a free port with trust authentication.
"""

from __future__ import annotations

import csv
import glob
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--calib-size", "2", "--eval-size", "2", "--batch-size", "2", "--quiet"]
HEARTBEAT = ["--heartbeat", "1", "--grace", "2"]


def make_checkpoint(path: Path) -> Path:
    """The embedded model's structure with seeded random weights (as tests/test_cli.py)."""
    from mnq_search.io import save_weights
    from mnq_search.zoo import create_zoo_model

    torch.manual_seed(0)
    save_weights(create_zoo_model("fmnist-deit-tiny"), path)
    return path


def make_sensitivity(path: Path) -> Path:
    """A seeded synthetic sensitivity table for the embedded model's slots: the greedy warm starts
    need one, and measuring it costs far more than the searches under test."""
    from mnq_search.convert import convert_model
    from mnq_search.slot import methods_for
    from mnq_search.zoo import create_zoo_model

    slot_ops = convert_model(create_zoo_model("fmnist-deit-tiny"), 8).slot_ops()
    rng = random.Random(0)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slot", "op", "method", "asqnr_in", "asqnr_out", "sqnr_diff"])
        for slot, op in slot_ops.items():
            for m in methods_for(op):
                a, b = rng.uniform(10, 40), rng.uniform(10, 40)
                w.writerow([slot, op, m, a, b, b - a])
    return path


def worker_cmd(ckpt: Path, sens: Path, out: Path, *args: str) -> list[str]:
    """``mnq-search run --strategy optuna`` with the proxy objective, tiny data, fast heartbeats."""
    return [sys.executable, "-m", "mnq_search.cli", "run", "--strategy", "optuna", "--checkpoint", str(ckpt),
            "--sensitivity-cache", str(sens), "--out", str(out), *FAST, *HEARTBEAT, *args]


def start_worker(cmd: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    fh = log.open("w")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"worker did not finish in {timeout} s:\n{log.read_text()[-3000:]}") from None
    assert rc == 0, f"worker exited {rc}:\n{log.read_text()[-3000:]}"


def read_trials(url: str, study: str):
    """The study's trials, read through a separate connection that never waits long for a lock."""
    import optuna

    kwargs = {"connect_args": {"timeout": 1}} if url.startswith("sqlite") else {}
    storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, skip_table_creation=True)
    try:
        return optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    finally:
        storage.engine.dispose()


def kill_mid_trial(proc: subprocess.Popen, url: str, study: str, log: Path, min_complete: int = 1,
                   timeout: float = 180) -> int:
    """SIGKILL the worker while it runs a trial, after ``min_complete`` trials completed; returns the
    number of the trial it was running. The worker is stopped (SIGSTOP) while the trial's state is
    read, so the kill lands mid-trial for sure."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise AssertionError(f"worker ended before it could be killed:\n{log.read_text()[-3000:]}")
        try:
            trials = read_trials(url, study)
        except Exception:  # the study is not there yet, or the file is locked: look again
            time.sleep(0.1)
            continue
        done = sum(t.state.name == "COMPLETE" for t in trials)
        if done >= min_complete and any(t.state.name == "RUNNING" for t in trials):
            os.kill(proc.pid, signal.SIGSTOP)
            try:
                running = [t.number for t in read_trials(url, study) if t.state.name == "RUNNING"]
            except Exception:
                running = []
            if running:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return running[0]
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("no running trial to kill")


# --- PostgreSQL ----------------------------------------------------------------------------------

def find_pg_bin() -> Path | None:
    if os.environ.get("MNQ_PG_BIN"):
        return Path(os.environ["MNQ_PG_BIN"])
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                  if Path(d).parent.name.isdigit() else 0)
    for d in reversed(dirs):
        if (Path(d) / "initdb").is_file() and (Path(d) / "pg_ctl").is_file():
            return Path(d)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """initdb + pg_ctl in a temporary folder; :meth:`database` creates a database and gives its URL."""

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="mnq-pg-"))
        self.data, self.sock, self.log = self.root / "data", self.root / "sock", self.root / "server.log"
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:  # postgres refuses root: run it as the postgres system user
            import pwd

            pw = pwd.getpwnam("postgres")
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError("running as root needs runuser (util-linux) to start postgres")
            self.prefix = [runuser, "-u", "postgres", "--"]
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.sock.mkdir()
        if self.prefix:
            os.chown(self.sock, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str) -> None:
        res = subprocess.run([*self.prefix, *args], capture_output=True, text=True, timeout=120)
        if res.returncode:
            log = self.log.read_text()[-2000:] if self.log.is_file() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed: {res.stdout[-1000:]}{res.stderr[-1000:]}{log}")

    def start(self) -> "PostgresServer":
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "-N")
        opts = (f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", opts, "start")
        return self

    def database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread in the search tests (as the worker processes get through
    OMP_NUM_THREADS): their tensors are small, and on a busy 2-core machine two threads that wait
    for each other make every trial several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def in_threads(fn, n: int) -> list[Exception]:
    """Run ``fn(i)`` for i in range(n) in n threads at once; the exceptions they raised."""
    errors: list[Exception] = []

    def target(i):
        try:
            fn(i)
        except Exception as exc:  # noqa: BLE001 (returned to the test)
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
