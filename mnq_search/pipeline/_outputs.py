"""The files a run writes (each atomically, through a temporary name) and the sensitivity CSV."""

from __future__ import annotations

import csv
import io as _io
from pathlib import Path
from typing import Any

from ..io import atomic_write_json, atomic_write_text, csv_text
from ..plan import save_assignment

SENSITIVITY_FIELDS = ("slot", "op", "method", "asqnr_in", "asqnr_out", "sqnr_diff")


def read_sensitivity_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("asqnr_in", "asqnr_out", "sqnr_diff"):
            r[k] = float(r[k])
    return rows


def sensitivity_csv(rows: list[dict]) -> str:
    return csv_text(SENSITIVITY_FIELDS, rows)


def write_run_outputs(out: Path, result: dict, assignment: dict, rows: list[dict] | None,
                      search: dict | None = None, pareto: dict | None = None) -> list[str]:
    """assignment.json, sensitivity.csv (when measured), search.json and pareto.json (joint search)
    and result.json, each atomically; result.json last, so its presence marks a finished run.
    Returns the names written."""
    written = ["assignment.json"]
    save_assignment(out / "assignment.json", assignment, model=result["model"], bits=result["bits"],
                    nl_bits=result["nl_bits"], fine_grid=result["fine_grid"], strategy=result["strategy"],
                    **({"post_ln": result["post_ln"]} if result.get("post_ln", "tensor") != "tensor" else {}),
                    seed=result["seed"])
    if rows is not None:
        atomic_write_text(out / "sensitivity.csv", sensitivity_csv(rows))
        written.append("sensitivity.csv")
    if search is not None:
        atomic_write_json(out / "search.json", search)
        written.append("search.json")
    if pareto is not None:
        atomic_write_json(out / "pareto.json", pareto)
        written.append("pareto.json")
    atomic_write_json(out / "result.json", result)
    return written + ["result.json"]


def append_results_csv(path: Path, row: dict[str, Any]) -> None:
    """Append one row (timm validate.py's --results-file), rewriting the file atomically."""
    flat = {k: v for k, v in row.items() if k != "counts"}
    old = path.read_text() if path.is_file() else ""
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(flat), lineterminator="\n")
    if not old:
        w.writeheader()
    w.writerow(flat)
    atomic_write_text(path, old + buf.getvalue())
