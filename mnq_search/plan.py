"""Assignments: which integer method each slot uses, as data (JSON), validated against a model.

An assignment is a mapping ``slot name -> method``. Its JSON form is

.. code-block:: json

    {"model": "fmnist-deit-tiny", "bits": 8, "strategy": "sqnr_diff",
     "default": {"softmax": "ivit"},
     "slots": {"blocks.0.attn.softmax": "ibert", "blocks.0.norm1": "ivit"}}

where ``default`` (optional, per op) fills the slots that ``slots`` does not name: per-layer
settings override per-op ones (the layering of ``torch.ao``'s ``QConfigMapping``). A file that
holds a bare ``{"slot": "method"}`` mapping is read too.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import UsageError
from .io import atomic_write_json, read_json
from .methods import OPS
from .slot import methods_for


def validate_assignment(assignment: Mapping[str, str], slot_ops: Mapping[str, str]) -> None:
    """Raise a one-line UsageError for an unknown slot or a method invalid for the slot's op."""
    for name, method in assignment.items():
        if name not in slot_ops:
            close = difflib.get_close_matches(name, list(slot_ops), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown slot {name!r}{hint}; the model has {len(slot_ops)} slots, "
                             f"e.g. {', '.join(list(slot_ops)[:3])}")
        op = slot_ops[name]
        valid = methods_for(op, include_float=True)
        if method not in valid:
            raise UsageError(f"method {method!r} is not valid for {op} slot {name!r}; choose from: {', '.join(valid)}")


def counts(assignment: Mapping[str, str], slot_ops: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Slots per op x method, as in the paper's Table 3 (every method of the op listed, zeros too)."""
    table = {op: {m: 0 for m in methods_for(op, include_float=True)} for op in OPS}
    for name, method in assignment.items():
        table[slot_ops[name]][method] += 1
    return {op: {m: n for m, n in row.items() if m != "float" or n} for op, row in table.items()}


def save_assignment(path: str | Path, assignment: Mapping[str, str], **meta: Any) -> None:
    atomic_write_json(path, {**meta, "slots": dict(assignment)})


def load_assignment(path: str | Path, slot_ops: Mapping[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
    """Read an assignment file and resolve it against a model's slots; returns (assignment, metadata)."""
    data = read_json(path, "assignment file")
    if not isinstance(data, dict):
        raise UsageError(f"assignment file {path} must hold a JSON object")
    if "slots" in data or "default" in data:
        slots = data.get("slots", {})
        default = data.get("default", {})
        meta = {k: v for k, v in data.items() if k not in ("slots", "default")}
    else:
        slots, default, meta = data, {}, {}
    if not isinstance(slots, dict) or not isinstance(default, dict):
        raise UsageError(f"assignment file {path}: 'slots' and 'default' must be objects")
    bad_ops = [op for op in default if op not in OPS]
    if bad_ops:
        raise UsageError(f"assignment file {path}: unknown op {bad_ops[0]!r} in 'default'; choose from: {', '.join(OPS)}")
    resolved = {name: default[op] for name, op in slot_ops.items() if op in default}
    resolved.update(slots)
    validate_assignment(resolved, slot_ops)
    missing = [n for n in slot_ops if n not in resolved]
    if missing:
        raise UsageError(f"assignment file {path} leaves {len(missing)} slots without a method "
                         f"(e.g. {missing[0]!r}); name them or give a per-op 'default'")
    return {n: resolved[n] for n in slot_ops}, meta
