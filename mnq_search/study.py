"""Studies: a TOML spec of cells (model x bits x strategy x QAT epochs) run to one tidy CSV.

.. code-block:: toml

    name = "paper-tables"                # results go to <results_dir>/<name>.csv and .md
    models = ["fmnist-deit-tiny"]
    bits = [8, 6]
    strategies = ["float", "uniform:ibert", "uniform:fqvit", "uniform:ivit",
                  "sqnr_output", "sqnr_diff", "sqnr_gain", "sqnr_diff_abs"]
    qat_epochs = [0, 1, 3]               # 0 = PTQ only
    [run]                                # RunSettings fields shared by every cell
    calib_size = 128
    eval_size = "all"
    [qat]                                # QATConfig fields; train_images = N trains each epoch on N images
    lr = 5e-5

``float`` is the float model (one row per model). A cell's result is kept in
``<work_dir>/cells/<cell>.json``; re-running the spec skips finished cells. The sensitivity table
of a (model, bits) pair is measured once and shared by all strategies of that pair.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
import tomllib
from dataclasses import dataclass, fields
from itertools import product
from pathlib import Path
from typing import Any

from .errors import UsageError
from .io import atomic_write_json, atomic_write_text, csv_text
from .runtime import EVAL_BATCH

TIDY_FIELDS = ("model", "bits", "strategy", "qat_epochs", "top1", "top5", "seconds", "device", "date")
FMNIST_TRAIN = 60_000


@dataclass
class StudySpec:
    name: str
    models: list[str]
    bits: list[int]
    strategies: list[str]
    qat_epochs: list[int]
    run: dict[str, Any]
    qat: dict[str, Any]
    results_dir: Path
    work_dir: Path
    path: Path

    def cells(self) -> list[tuple[str, int, str, int]]:
        out = []
        for model in self.models:
            if "float" in self.strategies:
                out.append((model, 32, "float", 0))
            for bits, strategy, epochs in product(self.bits, self.strategies, self.qat_epochs):
                if strategy != "float":
                    out.append((model, bits, strategy, epochs))
        return out


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec; every error is a one-line UsageError."""
    from strategies import list_strategies

    from .context import RunSettings
    from .qat import QATConfig
    from .quant import check_bits
    from .zoo import list_zoo

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"study spec not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"study spec {path} is not valid TOML: {exc}") from None
    known = {"name", "description", "models", "bits", "strategies", "qat_epochs", "run", "qat", "results_dir", "work_dir"}
    extra = sorted(set(raw) - known)
    if extra:
        raise UsageError(f"study spec {path}: unknown key {extra[0]!r}; known: {', '.join(sorted(known))}")
    for key in ("name", "models", "bits", "strategies"):
        if key not in raw:
            raise UsageError(f"study spec {path} has no {key!r}")
    import timm

    for m in raw["models"]:
        if m not in list_zoo() and not timm.is_model(m):
            raise UsageError(f"study spec {path}: unknown model {m!r}")
    for b in raw["bits"]:
        try:
            check_bits(b)
        except ValueError as exc:
            raise UsageError(f"study spec {path}: bits: {exc}") from None
    valid = set(list_strategies()) | {"float"}
    for s in raw["strategies"]:
        if s not in valid:
            raise UsageError(f"study spec {path}: unknown strategy {s!r}; choose from: {', '.join(sorted(valid))}")
    run_fields = {f.name for f in fields(RunSettings)} - {"strategy", "model", "bits", "out", "qat", "search",
                                                         "qat_epochs", "sensitivity_cache"}
    qat_fields = {f.name for f in fields(QATConfig)} - {"epochs", "steps", "holdout"} | {"train_images"}
    for table, allowed in (("run", run_fields), ("qat", qat_fields)):
        bad = sorted(set(raw.get(table, {})) - allowed)
        if bad:
            raise UsageError(f"study spec {path}: unknown [{table}] key {bad[0]!r}")
    epochs = raw.get("qat_epochs", [0])
    if any(not isinstance(e, int) or e < 0 for e in epochs):
        raise UsageError(f"study spec {path}: qat_epochs must be integers >= 0")
    root = path.parent
    return StudySpec(name=str(raw["name"]), models=list(raw["models"]), bits=list(raw["bits"]),
                     strategies=list(raw["strategies"]), qat_epochs=list(epochs), run=dict(raw.get("run", {})),
                     qat=dict(raw.get("qat", {})), results_dir=root / raw.get("results_dir", "results"),
                     work_dir=root / raw.get("work_dir", f"work/{raw['name']}"), path=path)


def _cell_id(model: str, bits: int, strategy: str, epochs: int) -> str:
    return f"{model}-{bits}bit-{strategy.replace(':', '_')}-qat{epochs}"


def run_study(spec_path: str | Path, progress: bool = True, device: str | None = None) -> Path:
    """Run every unfinished cell of a spec; returns the tidy CSV path."""
    from .context import RunSettings
    from .pipeline import default_device, device_name, run
    from .qat import QATConfig

    spec = load_spec(spec_path)
    cells_dir = spec.work_dir / "cells"
    cells = spec.cells()
    from tqdm.auto import tqdm

    for model, bits, strategy, epochs in tqdm(cells, desc=f"study {spec.name}", disable=not progress):
        cid = _cell_id(model, bits, strategy, epochs)
        if (cells_dir / f"{cid}.json").is_file():
            continue
        run_kw = {k: (None if k == "eval_size" and v == "all" else v) for k, v in spec.run.items()}
        t0 = time.perf_counter()
        if strategy == "float":
            row = _float_cell(model, run_kw, device, progress)
        else:
            qat = dict(spec.qat)
            train_images = qat.pop("train_images", None)
            if train_images is not None:
                qat["holdout"] = FMNIST_TRAIN - int(train_images)
            settings = RunSettings(strategy=strategy, model=model, bits=bits, out=str(spec.work_dir / "runs" / cid),
                                   qat_epochs=epochs, device=device, progress=False, qat=QATConfig(**qat),
                                   sensitivity_cache=str(spec.work_dir / f"sensitivity-{model}-{bits}bit.csv"),
                                   **run_kw)
            res = run(settings)
            row = {"top1": res["top1_quant"], "top5": res.get("top5_qat", res["top5_quant"])}
        row.update(model=model, bits=bits, strategy=strategy, qat_epochs=epochs,
                   seconds=round(time.perf_counter() - t0, 1), device=device_name(device or default_device()),
                   date=_dt.date.today().isoformat())
        atomic_write_json(cells_dir / f"{cid}.json", row)
    return write_tables(spec)


def _float_cell(model: str, run_kw: dict, device: str | None, progress: bool) -> dict:
    from .calibrate import evaluate
    from .pipeline import default_device, prepare

    device = device or default_device()
    m, _, data = prepare(model, run_kw.get("checkpoint"), run_kw.get("data"))
    res = evaluate(m.to(device), data.eval_batches(run_kw.get("eval_size", 2000), run_kw.get("batch_size", EVAL_BATCH)),
                   device)
    return {"top1": round(res["top1"], 3), "top5": round(res["top5"], 3)}


def write_tables(spec: StudySpec) -> Path:
    """Gather finished cells into ``<results_dir>/<name>.csv`` (tidy) and ``.md`` (pivot)."""
    rows = []
    for model, bits, strategy, epochs in spec.cells():
        f = spec.work_dir / "cells" / f"{_cell_id(model, bits, strategy, epochs)}.json"
        if f.is_file():
            rows.append(json.loads(f.read_text()))
    csv_path = spec.results_dir / f"{spec.name}.csv"
    atomic_write_text(csv_path, csv_text(TIDY_FIELDS, rows))
    atomic_write_text(spec.results_dir / f"{spec.name}.md", markdown_table(rows, spec))
    return csv_path


def markdown_table(rows: list[dict], spec: StudySpec) -> str:
    """Top-1 per strategy (rows) and bits x QAT epochs (columns), one table per model (Table 4/5 layout)."""
    seen = lambda key: ", ".join(sorted({str(r.get(key)) for r in rows if r.get(key)})) or "not recorded"  # noqa: E731
    lines = [f"# Study `{spec.name}`", "", f"Spec: `{spec.path}`. Top-1 (%) on the evaluation split; "
             "`QAT 0` is post-training quantization.", "",
             f"Command: `mnq-search study run {spec.path}`. Device: {seen('device')}. Date: {seen('date')}.", ""]
    for model in spec.models:
        mrows = [r for r in rows if r["model"] == model]
        if not mrows:
            continue
        cols = [(b, e) for b in spec.bits for e in spec.qat_epochs]
        lines += [f"## {model}", "", "| strategy | " + " | ".join(f"{b}-bit QAT {e}" for b, e in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        fp = next((r for r in mrows if r["strategy"] == "float"), None)
        if fp:
            lines.append(f"| float (32-bit) | {fp['top1']:.2f} |" + " |" * (len(cols) - 1))
        for s in spec.strategies:
            if s == "float":
                continue
            cells = []
            for b, e in cols:
                r = next((r for r in mrows if r["strategy"] == s and r["bits"] == b and r["qat_epochs"] == e), None)
                cells.append(f"{r['top1']:.2f}" if r and r["top1"] is not None else "")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"
