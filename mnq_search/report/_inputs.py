"""What a report reads: every run, QAT, study and Optuna file found anywhere under a folder.

- a *run* folder (``mnq-search run``): ``assignment.json``, ``sensitivity.csv``, ``result.json``;
- a *QAT* folder (``mnq-search qat``): ``history.csv`` (epoch, step, loss, top1, images_per_s),
  ``slot_asqnr.csv`` (slot, op, asqnr_out after QAT) and ``result.json``; a run with
  ``--qat-epochs`` keeps its history inside ``result.json`` (``qat_history``);
- a *study*: ``results.csv`` with columns model, bits, strategy, qat_epochs, top1 (top5, seconds);
- an *Optuna export*: a SQLite storage (``study.db``).

Files that are absent are simply not used; files that are present but unreadable are skipped with
a note (the report says so), never a failure.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SENSITIVITY_COLUMNS = ("slot", "op", "method", "asqnr_in", "asqnr_out", "sqnr_diff")
SLOT_ASQNR_COLUMNS = ("slot", "op", "asqnr_out")
HISTORY_COLUMNS = ("epoch", "top1")
STUDY_COLUMNS = ("model", "bits", "strategy", "top1")
STUDY_FILE = "results.csv"
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_SQLITE_MAGIC = b"SQLite format 3\x00"
_FOLDER_FILES = ("result.json", "assignment.json", "sensitivity.csv", "history.csv", "slot_asqnr.csv")


@dataclass
class Folder:
    """One run or QAT folder: whatever of its files could be read (None when absent)."""

    path: Path
    rel: str
    result: dict[str, Any] = field(default_factory=dict)
    assignment: dict[str, Any] | None = None
    sensitivity: list[dict[str, Any]] | None = None
    sensitivity_hash: str | None = None
    history: list[dict[str, Any]] | None = None
    slot_asqnr: list[dict[str, Any]] | None = None

    def _meta(self, key: str) -> Any:
        config = self.result.get("config") or {}
        for source in (self.result, config, self.assignment or {}):
            if source.get(key) is not None:
                return source[key]
        return None

    @property
    def label(self) -> str:
        """The folder's path relative to the report's folder, or its own name when it is that folder."""
        return self.path.name if self.rel == "." else self.rel

    @property
    def model(self) -> str:
        return str(self._meta("model") or "model")

    @property
    def bits(self) -> int | None:
        """The model-wide bit-width, or the one width every weight layer ran at when the run's record
        of all its layers' bits (result.json ``layer_bits.layers``) has them all alike (a W3A3 run
        below the model-wide 4)."""
        same = _same_layer_bits((self.result.get("layer_bits") or {}).get("layers"))
        bits = same if same is not None else self._meta("bits")
        return int(bits) if bits is not None else None

    @property
    def qat_variant(self) -> str:
        """What a QAT folder's recipe adds to plain QAT (``""`` for plain; the ``vvtq`` recipe with none
        of its parts only tracks oscillation): ``distill``, ``multicrop``, ``lsq``, ``reg`` (the
        variation-aware regulariser), ``freeze``, joined by ``+``."""
        q = self.result.get("qat") or {}
        parts = [name for name, on in (("distill", q.get("distill")), ("multicrop", q.get("multicrop")),
                                       ("lsq", q.get("vvtq_lsq")), ("reg", q.get("vvtq_strength")),
                                       ("freeze", q.get("vvtq_freeze"))) if on]
        return "+".join(parts)

    @property
    def strategy(self) -> str:
        return str(self._meta("strategy") or self.label)

    @property
    def is_qat(self) -> bool:
        return bool(self.history or self.slot_asqnr or self.result.get("qat_epochs")
                    or "top1_qat" in self.result)

    @property
    def chosen(self) -> dict[str, str]:
        """The run's assignment, ``{slot: method}`` (empty when unknown); a bare mapping is read too."""
        data = self.assignment or {}
        slots = data.get("slots", data if all(isinstance(v, str) for v in data.values()) else None)
        return {str(k): v for k, v in slots.items() if isinstance(v, str)} if isinstance(slots, dict) else {}


def _same_layer_bits(layers: Any) -> int | None:
    """The one width of a run's ``{layer: [w, a]}`` record when every layer has weights and
    activations at it, else None."""
    from ..budget import valid_layer_bits

    if not isinstance(layers, dict) or not layers:
        return None
    pairs = list(layers.values())
    if not all(isinstance(v, (list, tuple)) and len(v) == 2 and all(map(valid_layer_bits, v)) for v in pairs):
        return None
    widths = {b for pair in pairs for b in pair}
    return widths.pop() if len(widths) == 1 else None


@dataclass
class Inputs:
    """Everything found under ``root`` (relative paths in the report are relative to it)."""

    root: Path
    folders: list[Folder] = field(default_factory=list)
    studies: list[tuple[str, list[dict[str, Any]]]] = field(default_factory=list)
    optuna: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.folders or self.studies or self.optuna)

    def rel(self, path: Path) -> str:
        rel = path.relative_to(self.root).as_posix()
        return "." if rel in ("", ".") else rel


def find_inputs(root: str | Path, exclude: Path | None = None) -> Inputs:
    """Walk ``root`` (sorted, hidden folders and ``exclude`` skipped) and read every known file."""
    root = Path(root).resolve()
    exclude = exclude.resolve() if exclude is not None else None
    found = Inputs(root)
    for here, dirs, files in os.walk(root):
        here_path = Path(here)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                         and (exclude is None or here_path / d != exclude))
        names = set(files)
        if names & set(_FOLDER_FILES):
            folder = _read_folder(here_path, found)
            if folder is not None:
                found.folders.append(folder)
        if STUDY_FILE in names:
            rows = _read_csv(here_path / STUDY_FILE, STUDY_COLUMNS, found)
            if rows is not None:
                found.studies.append((found.rel(here_path / STUDY_FILE), rows))
        found.optuna += [here_path / f for f in sorted(names) if _is_sqlite(here_path / f)]
    return found


def _read_folder(path: Path, found: Inputs) -> Folder | None:
    folder = Folder(path, found.rel(path))
    if (path / "result.json").is_file():
        folder.result = _read_json(path / "result.json", found) or {}
    if (path / "assignment.json").is_file():
        folder.assignment = _read_json(path / "assignment.json", found)
    if (path / "sensitivity.csv").is_file():
        folder.sensitivity = _read_csv(path / "sensitivity.csv", SENSITIVITY_COLUMNS, found)
        folder.sensitivity_hash = hashlib.sha1((path / "sensitivity.csv").read_bytes()).hexdigest()
    if (path / "slot_asqnr.csv").is_file():
        folder.slot_asqnr = _read_csv(path / "slot_asqnr.csv", SLOT_ASQNR_COLUMNS, found)
    if (path / "history.csv").is_file():
        folder.history = _read_csv(path / "history.csv", HISTORY_COLUMNS, found)
    elif isinstance(folder.result.get("qat_history"), list):
        folder.history = _numeric_rows(folder.result["qat_history"])
    if folder.history is not None:
        folder.history = [r for r in folder.history if isinstance(r.get("top1"), float)] or None
    useful = folder.result or folder.sensitivity or folder.history or folder.slot_asqnr or folder.assignment
    return folder if useful else None


def _read_json(path: Path, found: Inputs) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        found.notes.append(f"skipped {found.rel(path)}: not valid JSON ({exc})")
        return None
    if not isinstance(data, dict):
        found.notes.append(f"skipped {found.rel(path)}: not a JSON object")
        return None
    return data


def _read_csv(path: Path, required: tuple[str, ...], found: Inputs) -> list[dict[str, Any]] | None:
    """Rows with numbers parsed (empty cells become None); None, with a note, when unusable."""
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            columns = reader.fieldnames or []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        found.notes.append(f"skipped {found.rel(path)}: unreadable ({exc})")
        return None
    missing = [c for c in required if c not in columns]
    if missing:
        found.notes.append(f"skipped {found.rel(path)}: no column {', '.join(missing)}")
        return None
    if not rows:
        found.notes.append(f"skipped {found.rel(path)}: no rows")
        return None
    return _numeric_rows(rows)


def _numeric_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: _number(v) for k, v in row.items()} for row in rows if isinstance(row, dict)]


def _number(value: Any) -> Any:
    if value is None or isinstance(value, (int, float)):
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value
    text = str(value).strip()
    if text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def _is_sqlite(path: Path) -> bool:
    if path.suffix not in SQLITE_SUFFIXES or not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
