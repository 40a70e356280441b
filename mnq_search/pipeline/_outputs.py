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


def pareto_csv(pareto: dict) -> str:
    """One line per front point: the trial, its objective values, the weight bytes (a search over
    bit-widths) and its methods per op (``softmax.ibert``: slots running it)."""
    front = pareto["front"]
    counts = sorted({f"{op}.{m}" for p in front for op, ms in p.get("counts", {}).items() for m in ms})
    extra = ["weight_bytes"] if any("weight_bytes" in p for p in front) else []
    rows = [{"trial": p["number"], **p["values"], **({"weight_bytes": p["weight_bytes"]} if extra else {}),
             **{c: p.get("counts", {}).get(c.split(".")[0], {}).get(c.split(".")[1], 0) for c in counts}}
            for p in front]
    return csv_text(["trial", *pareto["metrics"], *extra, *counts], rows)


def write_run_outputs(out: Path, result: dict, assignment: dict, rows: list[dict] | None,
                      search: dict | None = None, pareto: dict | None = None) -> list[str]:
    """assignment.json, sensitivity.csv (when measured), search.json, pareto.json and pareto.csv (joint search)
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
        atomic_write_text(out / "pareto.csv", pareto_csv(pareto))
        written += ["pareto.json", "pareto.csv"]
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
