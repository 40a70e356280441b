"""The paper's Tables 3 and 4, written as CSV, Markdown and HTML.

- Table 3: how many slots of each op use each method, one row per run (``result.json`` counts,
  or the assignment counted against the slots of ``sensitivity.csv``).
- Table 4: top-1 per strategy and bit-width, one column per model: the full-precision model
  (``top1_fp``, as "32-bit"), PTQ runs, QAT runs (by QAT epochs) and study rows (``results.csv``).
  Cells average repeated runs (Markdown and HTML show ``n``). Runs inside a study's folder are
  left to the study's own ``results.csv``, so no result is counted twice.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

from ..methods import NONLINEAR_METHODS
from ._inputs import Folder, Inputs
from ._qat import top1_per_epoch
from ._style import OP_TITLES, OPS, method_title

FULL_PRECISION = "full precision"
FP_BITS = 32


@dataclass
class Table:
    """A table with CSV keys (``columns``), display headers (``labels``) and cells; a cell is a
    value or a ``(mean, n)`` pair."""

    title: str
    columns: list[str]
    labels: list[str]
    rows: list[list[Any]] = field(default_factory=list)


def _cell_csv(value: Any) -> Any:
    if isinstance(value, tuple):
        return round(value[0], 3)
    return "" if value is None else value


def _cell_text(value: Any) -> str:
    if isinstance(value, tuple):
        avg, n = value
        return f"{avg:.2f}" + (f" (n={n})" if n > 1 else "")
    if isinstance(value, float):
        return f"{value:g}"
    return "—" if value is None else str(value)


def to_csv(table: Table) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(table.columns)
    w.writerows([_cell_csv(v) for v in row] for row in table.rows)
    return buf.getvalue()


def to_markdown(table: Table) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [f"**{esc(table.title)}**", "", "| " + " | ".join(map(esc, table.labels)) + " |",
             "|" + "---|" * len(table.labels)]
    lines += ["| " + " | ".join(esc(_cell_text(v)) for v in row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def to_html(table: Table, table_id: str) -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for label in table.labels)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell_text(v))}</td>" for v in row) + "</tr>\n"
                   for row in table.rows)
    return (f'<table id="{table_id}"><caption>{html.escape(table.title)}</caption>\n'
            f"<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>")


# --- Table 3 -------------------------------------------------------------------------------------

def table3_keys() -> list[tuple[str, str]]:
    """(op, method) columns of Table 3: every registered family's methods, read when the table is made."""
    return [(op, m) for op in OPS for m in NONLINEAR_METHODS[op]]


def _counts(folder: Folder) -> dict[str, dict[str, int]] | None:
    counts = folder.result.get("counts")
    if isinstance(counts, dict):
        return counts
    slot_ops = {str(r["slot"]): str(r["op"]) for r in folder.sensitivity or folder.slot_asqnr or []}
    if folder.chosen and slot_ops and set(folder.chosen) <= set(slot_ops):
        from ..plan import counts as count_slots

        return count_slots(folder.chosen, slot_ops)
    return None


def table3(folders: Sequence[Folder]) -> Table:
    """Table 3: slots per op x method for every run whose assignment is known."""
    table = Table("Table 3: non-linear methods chosen, slots per op and method",
                  ["folder", "model", "bits", "strategy"] + [f"{op}.{m}" for op, m in table3_keys()],
                  ["folder", "model", "bits", "strategy"]
                  + [f"{OP_TITLES[op]} {method_title(m)}" for op, m in table3_keys()])
    for f in folders:
        counts = _counts(f)
        if counts is not None:
            table.rows.append([f.label, f.model, f.bits, f.strategy]
                              + [int(counts.get(op, {}).get(m, 0)) for op, m in table3_keys()])
    return table


# --- Table 4 -------------------------------------------------------------------------------------

def _record(model: Any, bits: Any, strategy: Any, qat_epochs: Any, top1: Any) -> dict[str, Any] | None:
    if not isinstance(top1, (int, float)) or bits is None:
        return None
    return dict(model=str(model), bits=int(bits), strategy=str(strategy), qat_epochs=int(qat_epochs or 0),
                top1=float(top1))


def _qat_epochs(folder: Folder) -> int:
    r = folder.result
    epochs = r.get("qat_epochs") or (r.get("qat") or {}).get("epochs")
    if not epochs and folder.history:
        epochs = max(top1_per_epoch(folder.history)[0] or [0])
    return int(epochs or 0)


def folder_records(folder: Folder) -> list[dict[str, Any]]:
    """Top-1 records of one run or QAT folder: full precision, PTQ and (after QAT) QAT."""
    r, model, bits, strategy = folder.result, folder.model, folder.bits, folder.strategy
    recs = [_record(model, FP_BITS, FULL_PRECISION, 0, r.get("top1_fp"))]
    if folder.is_qat:
        # plain QAT and each recipe variant of one assignment are separate rows (their PTQ is one)
        trained = f"{strategy} (QAT +{folder.qat_variant})" if folder.qat_variant else strategy
        curve = top1_per_epoch(folder.history or [])[1]
        final = r.get("top1_qat", r.get("top1_quant") if r.get("qat_epochs") else None)
        recs.append(_record(model, bits, trained, _qat_epochs(folder), final if final is not None
                            else (curve[-1] if curve else None)))
        recs.append(_record(model, bits, strategy, 0, r.get("top1_ptq")))
    else:
        recs.append(_record(model, bits, strategy, 0, r.get("top1_quant")))
    return [x for x in recs if x is not None]


def top1_records(inputs: Inputs) -> list[dict[str, Any]]:
    """All top-1 records: folders outside any study's folder, then every study row."""
    study_dirs = [Path(rel).parent for rel, _ in inputs.studies]
    records, shared_ptq = [], set()
    for f in inputs.folders:
        folder = Path(f.rel)
        if not any(d == folder or d in folder.parents for d in study_dirs):
            for rec in folder_records(f):
                if f.is_qat and rec["qat_epochs"] == 0 and rec["strategy"] != FULL_PRECISION:
                    # QAT variants of one calibrated model (sibling folders) share its PTQ top-1: count it once
                    key = (folder.parent, *rec.values())
                    if key in shared_ptq:
                        continue
                    shared_ptq.add(key)
                records.append(rec)
    for _, rows in inputs.studies:
        records += [x for x in (_record(r.get("model"), r.get("bits"), r.get("strategy"), r.get("qat_epochs"),
                                        r.get("top1")) for r in rows) if x is not None]
    return records


def table4(records: Sequence[dict[str, Any]]) -> Table:
    """Table 4: mean top-1 per (strategy, bits, QAT epochs), one column per model."""
    models = sorted({r["model"] for r in records})
    cells: dict[tuple, dict[str, list[float]]] = {}
    for r in records:
        cells.setdefault((r["strategy"], r["bits"], r["qat_epochs"]), {}).setdefault(r["model"], []).append(r["top1"])
    order = sorted(cells, key=lambda k: (k[0] != FULL_PRECISION, -k[1], k[2], k[0]))
    table = Table("Table 4: top-1 (%) per strategy and bit-width", ["strategy", "bits", "qat_epochs"] + models,
                  ["strategy", "bits", "QAT epochs"] + models)
    for key in order:
        row = cells[key]
        table.rows.append(list(key) + [(mean(row[m]), len(row[m])) if m in row else None for m in models])
    return table
