"""``mnq-search export``: a study's trials as CSV, and a comparison CSV of the runs in a folder.

Trials CSV, one row per trial: ``number``, ``state``, one ``value_<metric>`` per objective,
``duration_s``, ``warm_start`` (the strategies whose assignment the trial is), ``retry_of`` (the
trial a killed worker left, that this one re-runs), ``same_as`` (the completed trial whose values
were copied), ``note`` (surplus / error / retried as), ``intermediate`` (JSON step -> value),
slots per op x method (``softmax_ibert`` ... ``layernorm_ivit``) and ``assignment`` (JSON).

Comparison CSV, one row per run (``result.json`` under the folder, any depth): model, bits,
fine grid, strategy, seed, QAT epochs, top-1 float / PTQ / final, image counts, slots per op x method, folder;
sorted by model, bits and strategy so the strategies run on one model and bit-width sit together.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..io import atomic_write_text, csv_text
from ..plan import OPS, counts
from ..slot import methods_for

COUNT_COLUMNS = [f"{op}_{m}" for op in OPS for m in methods_for(op)]


def _flat_counts(table: dict[str, dict[str, int]]) -> dict[str, int]:
    return {f"{op}_{m}": table.get(op, {}).get(m, 0) for op in OPS for m in methods_for(op)}


def resolve_study_name(storage, name: str | None) -> str:
    """``name``, checked; or the only study in the storage."""
    import optuna

    names = optuna.get_all_study_names(storage)
    if name is None:
        if len(names) == 1:
            return names[0]
        raise UsageError(f"the storage holds {len(names)} studies; name one with --study"
                         + (f" ({', '.join(sorted(names))})" if names else ""))
    if name not in names:
        from ..errors import unknown_choice

        raise unknown_choice("study", name, names)
    return name


def trial_rows(study) -> tuple[list[str], list[dict[str, Any]]]:
    """The trials CSV's header and rows (see the module docstring)."""
    from ._study import study_meta

    metrics = study.metric_names or [f"{i}" for i in range(len(study.directions))]
    slot_ops = study_meta(study).get("slot_ops")
    trials = study.get_trials(deepcopy=False)
    retried_as = {}
    for t in trials:
        history = t.system_attrs.get("retry_history") or []
        if history:
            retried_as[history[-1]] = t.number
    fields = (["number", "state"] + [f"value_{m}" for m in metrics]
              + ["duration_s", "warm_start", "retry_of", "same_as", "note", "intermediate"]
              + COUNT_COLUMNS + ["assignment"])
    rows = []
    for t in trials:
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        for m, v in zip(metrics, t.values or []):
            row[f"value_{m}"] = v if math.isfinite(v) else str(v)
        row["duration_s"] = round(t.duration.total_seconds(), 3) if t.duration else None
        row["warm_start"] = t.user_attrs.get("warm_start")
        row["retry_of"] = t.system_attrs.get("failed_trial")
        row["same_as"] = t.user_attrs.get("same_as")
        notes = []
        if t.user_attrs.get("surplus"):
            notes.append("surplus (budget taken; nothing evaluated)")
        if t.user_attrs.get("error"):
            notes.append(t.user_attrs["error"])
        if t.number in retried_as:
            notes.append(f"stale (worker lost); retried as trial {retried_as[t.number]}")
        row["note"] = "; ".join(notes) or None
        inter = t.intermediate_values or t.user_attrs.get("intermediate") or {}
        row["intermediate"] = json.dumps({str(k): v for k, v in inter.items()}) if inter else None
        if slot_ops and t.params and set(t.params) == set(slot_ops):
            row.update(_flat_counts(counts(t.params, slot_ops)))
        row["assignment"] = json.dumps(t.params) if t.params else None
        rows.append(row)
    return fields, rows


def export_trials(storage_url: str, study_name: str | None, csv_path: str | Path) -> tuple[str, int]:
    """Write the trials CSV of a study; returns (study name, row count)."""
    import optuna

    from ._storage import open_storage

    storage = open_storage(storage_url, create=False)
    name = resolve_study_name(storage, study_name)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
        fields, rows = trial_rows(study)
    finally:
        optuna.logging.set_verbosity(verbosity)
    atomic_write_text(csv_path, csv_text(fields, rows))
    return name, len(rows)


COMPARE_FIELDS = (["model", "bits", "fine_grid", "strategy", "seed", "qat_epochs", "top1_fp", "top1_ptq", "top1_quant",
                   "eval_images", "calib_images"] + COUNT_COLUMNS + ["folder"])


def compare_rows(folder: str | Path) -> list[dict[str, Any]]:
    """One row per run result (``result.json`` with strategy, bits, counts and top1_quant)."""
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"folder not found: {root}")
    rows = []
    for path in sorted(root.rglob("result.json")):
        try:
            rec = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue
        if not isinstance(rec, dict) or not all(k in rec for k in ("strategy", "bits", "counts", "top1_quant")):
            continue  # a QAT job or another tool's result
        row = {k: rec.get(k) for k in COMPARE_FIELDS if k in rec}
        row["fine_grid"] = bool(rec.get("fine_grid", False))
        row["qat_epochs"] = rec.get("qat_epochs", 0)
        row["top1_ptq"] = rec.get("top1_ptq", rec["top1_quant"])
        row.update(_flat_counts(rec["counts"]))
        row["folder"] = str(path.parent.relative_to(root)) or "."
        rows.append(row)
    rows.sort(key=lambda r: (str(r.get("model")), r.get("bits") or 0, bool(r.get("fine_grid")),
                             str(r.get("strategy")), r.get("seed") or 0, r["folder"]))
    return rows


def export_compare(folder: str | Path, csv_path: str | Path) -> int:
    rows = compare_rows(folder)
    if not rows:
        raise UsageError(f"no run results (result.json from 'mnq-search run') under {folder}")
    atomic_write_text(csv_path, csv_text(COMPARE_FIELDS, rows))
    return len(rows)
