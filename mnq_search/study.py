"""Studies: a TOML spec of cells run to one tidy CSV, resumable cell by cell.

The simple form (the paper's tables): model x bits x strategy x QAT epochs.

.. code-block:: toml

    name = "paper-tables"                # results go to <results_dir>/<name>.csv and .md
    models = ["fmnist-deit-tiny"]
    bits = [8, 6]
    strategies = ["float", "uniform:ibert", "sqnr_output", "sqnr_diff"]
    qat_epochs = [0, 1, 3]               # 0 = PTQ only
    [run]                                # RunSettings fields shared by every cell
    calib_size = 128
    eval_size = "all"
    [qat]                                # QATConfig fields; train_images = N trains each epoch on N images
    lr = 5e-5

The grouped form (``studies/where_mixing_wins.toml``) adds, per ``[[group]]``, the non-linear
bit-widths ``nl_bits`` (default: ``bits``), seeds for ``random`` (``random_seeds``), joint searches
named in ``[search.<name>]`` and used as strategy ``optuna:<name>``, and a ``[qat_phase]``: after
the PTQ cells of a (model, bits, nl_bits) setting are done, the best uniform, the best greedy rule
and the best searched assignment of that setting (by validation top-1) are trained by the same QAT
budget for every ``seed``. With ``record = true`` in ``[run]`` every cell keeps its per-image test
correctness and its validation top-1, which ``mnq-search study tables`` turns into paired
statistics against the best uniform method (:mod:`mnq_search.stats`, ``<name>_stats.csv``) and a
figure; every cell also records its integer-operation cost (the families' counts, and the tables
of ``cost_tables``).

``float`` is the float model (one row per model). A cell's result is kept in
``<work_dir>/cells/<cell>.json`` (written last, atomically): re-running the spec skips finished
cells, so a study killed anywhere loses only the cell it was running. The sensitivity table of a
(model, bits, nl_bits) setting is measured once and shared by the greedy cells.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import time
import tomllib
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from .errors import UsageError
from .io import atomic_write_json, atomic_write_text, csv_text
from .runtime import EVAL_BATCH

TIDY_FIELDS = ("model", "bits", "nl_bits", "strategy", "seed", "regime", "qat_of", "qat_epochs", "top1", "top1_val",
               "top5", "cost_mop", "counts", "seconds", "device", "date")
FMNIST_TRAIN = 60_000
GREEDY = ("sqnr_output", "sqnr_diff", "sqnr_gain", "sqnr_diff_abs")
QAT_SELECT = ("best_uniform", "best_greedy", "best_search")


def best_on_validation(items: list, top1_val=lambda r: r.get("top1_val")):
    """The item with the highest validation top-1 (ties: the earliest; items without one are left
    out; None when none has one): how a study chooses its best uniform, greedy and searched cells.
    Test top-1 never selects."""
    scored = [(top1_val(x), -i, x) for i, x in enumerate(items) if top1_val(x) is not None]
    return max(scored, key=lambda t: t[:2])[2] if scored else None


def cost_columns(rows: list[dict]) -> list[str]:
    """The ``cost_*`` keys of a study's cells, in first-seen order over every row (the float cell has
    none): the integer-op count and one per cost table of the spec."""
    return list(dict.fromkeys(k for r in rows for k in r if k.startswith("cost_")))


def strategy_kind(strategy: str) -> str:
    """``uniform``, ``greedy`` (the SQNR rules), ``float``, or ``search`` (every other strategy:
    sequential, coordinate, per_op, Optuna, random): the QAT phase's and the summary's categories."""
    if strategy == "float":
        return "float"
    return "uniform" if strategy.startswith("uniform:") else "greedy" if strategy in GREEDY else "search"


@dataclass(frozen=True)
class Cell:
    """One run of a study. ``bits`` is the linear layers' width (32 for the float model), ``nl_bits``
    the non-linear slots'; ``qat_of`` names the PTQ cell whose assignment a QAT-phase cell trains."""

    model: str
    bits: int
    nl_bits: int
    strategy: str
    seed: int | None = None
    qat_epochs: int = 0
    qat_of: str | None = None
    qat_seed: int | None = None

    @property
    def id(self) -> str:
        if self.qat_of:
            return f"{self.qat_of}-qatphase-s{self.qat_seed}"
        nl = f"-nl{self.nl_bits}" if self.nl_bits != self.bits else ""
        seed = f"-s{self.seed}" if self.seed is not None else ""
        return f"{self.model}-{self.bits}bit{nl}-{self.strategy.replace(':', '_')}{seed}-qat{self.qat_epochs}"

    @property
    def setting(self) -> tuple[str, int, int]:
        return self.model, self.bits, self.nl_bits


@dataclass
class StudySpec:
    name: str
    groups: list[dict[str, Any]]
    run: dict[str, Any]
    qat: dict[str, Any]
    search: dict[str, dict[str, Any]]
    qat_phase: dict[str, Any] | None
    cost_tables: dict[str, str]
    results_dir: Path
    work_dir: Path
    path: Path
    models: list[str] = field(default_factory=list)
    subset_of: str | None = None  # the whole study's name, when this is a subset of its models

    def subset(self, models: list[str]) -> StudySpec:
        """The same spec restricted to ``models`` (in the spec's order), its tables named
        ``<name>_<model>...``: a part of a study tabulated on its own while the rest still runs."""
        chosen = [m for m in self.models if m in models]
        groups = [dict(g, models=[m for m in g["models"] if m in chosen]) for g in self.groups]
        return dataclasses.replace(self, name="_".join([self.name, *chosen]), models=chosen,
                                   groups=[g for g in groups if g["models"]], subset_of=self.name)

    def cells(self) -> list[Cell]:
        """The PTQ (and ``qat_epochs``) cells, in order; the QAT phase's come from :func:`qat_cells`."""
        out: list[Cell] = []
        for g in self.groups:
            for model in g["models"]:
                if "float" in g["strategies"] and Cell(model, 32, 32, "float") not in out:
                    out.append(Cell(model, 32, 32, "float"))
                for bits, nl, strategy, epochs in product(g["bits"], g.get("nl_bits") or [None], g["strategies"],
                                                          g.get("qat_epochs", [0])):
                    if strategy == "float":
                        continue
                    nl = bits if nl in (None, "same") else nl
                    seeds = g.get("random_seeds") if strategy == "random" and g.get("random_seeds") else [None]
                    for seed in seeds:
                        out.append(Cell(model, bits, nl, strategy, seed, epochs))
        return out


def _parses(strategy: str) -> bool:
    """A strategy with a free argument (``unified:0.5,0.5,0``) that parses."""
    from strategies import get_strategy

    try:
        get_strategy(strategy)
    except UsageError:
        return False
    return ":" in strategy


def _check_group(g: dict, path: Path, valid_strategies: set[str], searches: dict) -> dict:
    import timm

    from .integer import check_bits
    from .zoo import list_zoo

    known = {"models", "bits", "nl_bits", "strategies", "qat_epochs", "random_seeds"}
    extra = sorted(set(g) - known)
    if extra:
        raise UsageError(f"study spec {path}: unknown key {extra[0]!r}; known: {', '.join(sorted(known))}")
    for key in ("models", "bits", "strategies"):
        if key not in g:
            raise UsageError(f"study spec {path} has no {key!r}")
    for m in g["models"]:
        if m not in list_zoo() and not timm.is_model(m):
            raise UsageError(f"study spec {path}: unknown model {m!r}")
    for b in list(g["bits"]) + [b for b in g.get("nl_bits") or [] if b != "same"]:
        try:
            check_bits(b)
        except ValueError as exc:
            raise UsageError(f"study spec {path}: bits: {exc}") from None
    for s in g["strategies"]:
        name, _, arg = s.partition(":")
        if name == "optuna" and arg:
            if arg not in searches:
                raise UsageError(f"study spec {path}: strategy {s!r} names no [search.{arg}] table")
        elif s not in valid_strategies and not _parses(s):
            raise UsageError(f"study spec {path}: unknown strategy {s!r}; choose from: {', '.join(sorted(valid_strategies))}")
    if any(not isinstance(e, int) or e < 0 for e in g.get("qat_epochs", [0])):
        raise UsageError(f"study spec {path}: qat_epochs must be integers >= 0")
    return g


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study spec; every error is a one-line UsageError."""
    from strategies import list_strategies

    from .context import RunSettings
    from .qat import QATConfig
    from .search import SearchOptions

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"study spec not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"study spec {path} is not valid TOML: {exc}") from None
    known = {"name", "description", "models", "bits", "strategies", "qat_epochs", "run", "qat", "results_dir",
             "work_dir", "group", "search", "qat_phase", "cost_tables", "nl_bits", "random_seeds", "cpu_hours"}
    extra = sorted(set(raw) - known)
    if extra:
        raise UsageError(f"study spec {path}: unknown key {extra[0]!r}; known: {', '.join(sorted(known))}")
    if "name" not in raw:
        raise UsageError(f"study spec {path} has no 'name'")
    searches = raw.get("search", {})
    for sname, opts in searches.items():
        try:
            SearchOptions.from_dict(opts)
        except (UsageError, TypeError) as exc:
            raise UsageError(f"study spec {path}: [search.{sname}]: {exc}") from None
    valid = set(list_strategies()) | {"float"}
    if "group" in raw:
        groups = [_check_group(dict(g), path, valid, searches) for g in raw["group"]]
    else:
        groups = [_check_group({k: raw[k] for k in ("models", "bits", "strategies", "qat_epochs", "nl_bits",
                                                    "random_seeds") if k in raw}, path, valid, searches)]
    run_fields = {f.name for f in dataclasses.fields(RunSettings)} - {"strategy", "model", "bits", "nl_bits", "out",
                                                                      "qat", "search", "qat_epochs",
                                                                      "sensitivity_cache", "record_images"}
    run_fields |= {"record"}
    qat_fields = {f.name for f in dataclasses.fields(QATConfig)} - {"epochs", "steps", "holdout"} | {"train_images"}
    for table, allowed in (("run", run_fields), ("qat", qat_fields)):
        bad = sorted(set(raw.get(table, {})) - allowed)
        if bad:
            raise UsageError(f"study spec {path}: unknown [{table}] key {bad[0]!r}")
    phase = raw.get("qat_phase")
    if phase is not None:
        bad = sorted(set(phase) - {"steps", "seeds", "select", "batch_size", "lr"})
        if bad:
            raise UsageError(f"study spec {path}: unknown [qat_phase] key {bad[0]!r}")
        if not isinstance(phase.get("steps"), int) or phase["steps"] <= 0:
            raise UsageError(f"study spec {path}: [qat_phase] steps must be a positive integer")
        for s in phase.get("select", QAT_SELECT):
            if s not in QAT_SELECT:
                raise UsageError(f"study spec {path}: [qat_phase] select {s!r}; choose from: {', '.join(QAT_SELECT)}")
    for cname, cpath in raw.get("cost_tables", {}).items():
        if not (path.parent / cpath).is_file():
            raise UsageError(f"study spec {path}: cost table {cname!r} not found: {path.parent / cpath}")
    root = path.parent
    models = list(dict.fromkeys(m for g in groups for m in g["models"]))
    return StudySpec(name=str(raw["name"]), groups=groups, run=dict(raw.get("run", {})), qat=dict(raw.get("qat", {})),
                     search=dict(searches), qat_phase=phase, cost_tables=dict(raw.get("cost_tables", {})),
                     results_dir=root / raw.get("results_dir", "results"),
                     work_dir=root / raw.get("work_dir", f"work/{raw['name']}"), path=path, models=models)


def _settings_for(spec: StudySpec, cell: Cell, device: str | None):
    from .context import RunSettings
    from .qat import QATConfig
    from .search import SearchOptions

    run_kw = {k: (None if k == "eval_size" and v == "all" else v) for k, v in spec.run.items() if k != "record"}
    if cell.seed is not None:
        run_kw["seed"] = cell.seed
    qat = dict(spec.qat)
    train_images = qat.pop("train_images", None)
    if train_images is not None:
        qat["holdout"] = FMNIST_TRAIN - int(train_images)
    name, _, arg = cell.strategy.partition(":")
    search = SearchOptions.from_dict(spec.search[arg]) if name == "optuna" and arg else None
    return RunSettings(strategy="optuna" if search is not None else cell.strategy, model=cell.model, bits=cell.bits,
                       nl_bits=cell.nl_bits, out=str(spec.work_dir / "runs" / cell.id), qat_epochs=cell.qat_epochs,
                       device=device, progress=False, qat=QATConfig(**qat), search=search,
                       record_images=bool(spec.run.get("record")),
                       sensitivity_cache=str(spec.work_dir / f"sensitivity-{cell.model}-{cell.bits}bit-nl{cell.nl_bits}.csv"),
                       **run_kw)


class _Costs:
    """Integer-operation cost of assignments, per model (slot geometry measured once)."""

    def __init__(self, spec: StudySpec, device: str | None):
        self.spec, self.device, self.geometry = spec, device or "cpu", {}

    def __call__(self, model: str, assignment: dict[str, str]) -> dict[str, float]:
        from objectives.cost import CostObjective, slot_geometry

        from .convert import convert_model
        from .pipeline import prepare

        if model not in self.geometry:
            m, _, data = prepare(model, self.spec.run.get("checkpoint"), self.spec.run.get("data"))
            q = convert_model(m, 8)
            self.geometry[model] = (slot_geometry(q, data.calib_batches(1, 1), "cpu"), q.slot_ops())
        geometry, slot_ops = self.geometry[model]
        out = {}
        for name, table in [("cost_mop", None)] + [(f"cost_{k}", self.spec.path.parent / v)
                                                   for k, v in self.spec.cost_tables.items()]:
            obj = CostObjective(table)
            obj.geometry = geometry
            out[name] = round(obj.evaluate(assignment, slot_ops=slot_ops), 6)
        return out


def _run_cell(spec: StudySpec, cell: Cell, device: str | None, progress: bool, costs: _Costs) -> dict:
    from .pipeline import run

    if cell.strategy == "float":
        return _float_cell(spec, cell, device)
    res = run(_settings_for(spec, cell, device))
    assignment = json.loads((Path(spec.work_dir / "runs" / cell.id) / "assignment.json").read_text())["slots"]
    row = {"top1": res["top1_quant"], "top5": res.get("top5_quant"), "top1_val": res.get("top1_val"),
           "counts": json.dumps(res["counts"], separators=(",", ":")), "regime": "qat" if cell.qat_epochs else "ptq",
           "search_seconds": (res.get("search") or {}).get("seconds")}
    row.update(costs(cell.model, assignment))
    return row


def _qat_cell(spec: StudySpec, cell: Cell, device: str | None, costs: _Costs) -> dict:
    from .pipeline import qat_job
    from .qat import QATConfig

    src = spec.work_dir / "runs" / cell.qat_of
    phase = spec.qat_phase
    settings = dataclasses.replace(_settings_for(spec, Cell(cell.model, cell.bits, cell.nl_bits, "sqnr_diff"), device),
                                   record_images=bool(spec.run.get("record")))
    qcfg = QATConfig(steps=phase["steps"], batch_size=phase.get("batch_size", 64), lr=phase.get("lr", 5e-5),
                     seed=cell.qat_seed)
    res = qat_job(str(src / "assignment.json"), settings, qcfg, str(spec.work_dir / "runs" / cell.id),
                  bits_given=True, fine_grid_given=False)
    assignment = json.loads((src / "assignment.json").read_text())["slots"]
    row = {"top1": res["top1_qat"], "top1_ptq": res["top1_ptq"], "top1_val": res.get("top1_val"),
           "counts": json.dumps(res["counts"], separators=(",", ":")), "regime": "qat",
           "strategy": json.loads((src / "result.json").read_text())["strategy"]}
    row.update(costs(cell.model, assignment))
    return row


def qat_cells(spec: StudySpec, done: dict[str, dict]) -> list[Cell]:
    """The QAT phase: per finished (model, bits, nl_bits) setting, the best uniform, the best greedy
    and the best searched PTQ assignment by validation top-1 (ties: test top-1 is *not* used, the
    earlier cell wins), trained once per seed."""
    if not spec.qat_phase:
        return []
    select = spec.qat_phase.get("select", QAT_SELECT)
    out = []
    for setting, cells in ptq_cells_by_setting(spec).items():
        if not all(c.id in done for c in cells):
            continue
        for kind in select:
            best = best_on_validation([c for c in cells if f"best_{strategy_kind(c.strategy)}" == kind],
                                      lambda c: done[c.id].get("top1_val"))
            if best is None:
                continue
            for seed in spec.qat_phase.get("seeds", [0]):
                cell = Cell(best.model, best.bits, best.nl_bits, best.strategy, best.seed, 0, best.id, seed)
                if cell not in out:
                    out.append(cell)
    return out


def ptq_cells_by_setting(spec: StudySpec) -> dict[tuple, list[Cell]]:
    """The spec's quantized PTQ cells (no float, no QAT) per (model, bits, nl_bits) setting."""
    by_setting: dict[tuple, list[Cell]] = {}
    for c in spec.cells():
        if c.strategy != "float" and c.qat_epochs == 0:
            by_setting.setdefault(c.setting, []).append(c)
    return by_setting


def _chosen_models(spec: StudySpec, models: list[str] | None) -> list[str]:
    if models is not None:
        unknown = [m for m in models if m not in spec.models]
        if unknown or not models:
            raise UsageError(f"--models: {unknown[0] if unknown else '(none)'} is not a model of {spec.path}; "
                             f"its models: {', '.join(spec.models)}")
    return [m for m in spec.models if models is None or m in models]


def tables_of(spec_path: str | Path, models: list[str] | None = None) -> Path:
    """Rebuild a study's tables from its finished cells; with ``models``, only theirs, as
    ``<name>_<model>...`` files next to the whole study's."""
    spec = load_spec(spec_path)
    return write_tables(spec if models is None else spec.subset(_chosen_models(spec, models)))


def check_models(spec: StudySpec, models: list[str] | None) -> list[str]:
    """The spec's models to run (``models``: a subset, in the spec's order), each checked to have
    weights (a zoo model's shipped file or the spec's ``[run] checkpoint``) before any cell runs."""
    from .zoo import default_weights_path, list_zoo, missing_weights

    chosen = _chosen_models(spec, models)
    if spec.run.get("checkpoint") is None:
        for m in chosen:
            if m in list_zoo() and not default_weights_path(m).is_file():
                raise missing_weights(m, f" of {spec.path}", "leave it out with --models")
    return chosen


def run_study(spec_path: str | Path, progress: bool = True, device: str | None = None,
              models: list[str] | None = None) -> Path:
    """Run every unfinished cell of a spec (then the QAT phase's), of every model or of ``models``
    only; returns the tidy CSV path (the tables always hold every finished cell)."""
    from tqdm.auto import tqdm

    from .pipeline import default_device, device_name

    spec = load_spec(spec_path)
    chosen = check_models(spec, models)
    cells_dir = spec.work_dir / "cells"
    costs = _Costs(spec, device)
    for phase in ("ptq", "qat"):
        done = _finished(spec)
        cells = spec.cells() if phase == "ptq" else qat_cells(spec, done)
        cells = [c for c in cells if c.model in chosen]
        for cell in tqdm(cells, desc=f"study {spec.name} ({phase})", disable=not progress):
            if cell.id in done:
                continue
            t0 = time.perf_counter()
            row = _qat_cell(spec, cell, device, costs) if cell.qat_of else _run_cell(spec, cell, device, progress, costs)
            row.setdefault("strategy", cell.strategy)
            # a QAT-phase row's seed is its training seed (a random cell's own seed is in qat_of's cell id)
            row.update(model=cell.model, bits=cell.bits, nl_bits=cell.nl_bits, seed=cell.qat_seed if cell.qat_of
                       else cell.seed, qat_of=cell.qat_of, qat_epochs=cell.qat_epochs,
                       seconds=round(time.perf_counter() - t0, 1), device=device_name(device or default_device()),
                       date=_dt.date.today().isoformat(), cell=cell.id)
            atomic_write_json(cells_dir / f"{cell.id}.json", row)
    return write_tables(spec)


def _finished(spec: StudySpec) -> dict[str, dict]:
    folder = spec.work_dir / "cells"
    return {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.is_dir() else {}


def _float_cell(spec: StudySpec, cell: Cell, device: str | None) -> dict:
    from .calibrate import evaluate
    from .pipeline import default_device, prepare

    device = device or default_device()
    run_kw = spec.run
    m, _, data = prepare(cell.model, run_kw.get("checkpoint"), run_kw.get("data"))
    eval_size = None if run_kw.get("eval_size", 2000) == "all" else run_kw.get("eval_size", 2000)
    res = evaluate(m.to(device), data.eval_batches(eval_size, run_kw.get("batch_size", EVAL_BATCH)), device)
    return {"top1": round(res["top1"], 3), "top5": round(res["top5"], 3), "regime": "float"}


def write_tables(spec: StudySpec) -> Path:
    """Gather finished cells into ``<results_dir>/<name>.csv`` (tidy) and ``.md``; with recorded
    per-image results also ``<name>_stats.csv`` and ``<name>.png`` (:mod:`mnq_search.study_stats`)."""
    done = _finished(spec)
    order = spec.cells() + qat_cells(spec, done)
    rows = [done[c.id] for c in order if c.id in done]
    csv_path = spec.results_dir / f"{spec.name}.csv"
    costs = tuple(k for k in cost_columns(rows) if k not in TIDY_FIELDS)  # each of the spec's cost_tables
    atomic_write_text(csv_path, csv_text(TIDY_FIELDS + costs, rows))
    atomic_write_text(spec.results_dir / f"{spec.name}.md", markdown_table(rows, spec))
    if spec.run.get("record"):
        from .study_stats import write_statistics

        write_statistics(spec, rows)
    return csv_path


def markdown_table(rows: list[dict], spec: StudySpec) -> str:
    """Top-1 per strategy (rows) and setting x regime (columns), one table per model."""
    seen = lambda key: ", ".join(sorted({str(r.get(key)) for r in rows if r.get(key)})) or "not recorded"  # noqa: E731
    lines = [f"# Study `{spec.name}`", "", f"Spec: `{spec.path}`. Top-1 (%) on the evaluation split; "
             "`QAT 0` is post-training quantization.", "",
             f"Command: `mnq-search study run {spec.path}`. Device: {seen('device')}. Date: {seen('date')}.", ""]
    if spec.subset_of:
        lines += [f"Only the cells of {', '.join(spec.models)} (`mnq-search study tables {spec.path} --models "
                        f"{','.join(spec.models)}`): a part of the study `{spec.subset_of}`.", ""]
    for model in spec.models:
        mrows = [r for r in rows if r["model"] == model]
        if not mrows:
            continue
        cols = list(dict.fromkeys((r["bits"], r.get("nl_bits", r["bits"]), r.get("qat_epochs", 0), r.get("regime"))
                                  for r in mrows if r["strategy"] != "float" or r.get("regime") == "qat"))
        label = lambda b, nl, e, reg: (f"{b}-bit" if nl == b else f"w{b} nl{nl}") + (  # noqa: E731
            " QAT phase" if reg == "qat" and not e else f" QAT {e}")
        lines += [f"## {model}", "", "| strategy | " + " | ".join(label(*c) for c in cols) + " |",
                  "|---|" + "---:|" * len(cols)]
        fp = next((r for r in mrows if r["strategy"] == "float" and r.get("regime") != "qat"), None)
        if fp:
            lines.append(f"| float (32-bit) | {fp['top1']:.2f} |" + " |" * (len(cols) - 1))
        strategies = list(dict.fromkeys((r["strategy"], r.get("seed")) for r in mrows if r["strategy"] != "float"))
        for s, seed in strategies:
            cells = []
            for b, nl, e, reg in cols:
                r = next((r for r in mrows if r["strategy"] == s and r.get("seed") == seed and r["bits"] == b
                          and r.get("nl_bits", b) == nl and r.get("qat_epochs", 0) == e and r.get("regime") == reg), None)
                cells.append(f"{r['top1']:.2f}" if r and r.get("top1") is not None else "")
            name = s if seed is None or not s.startswith("random") else f"{s} (seed {seed})"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"
