"""Assignments: which integer method each slot uses, as data (JSON), validated against a model.

An assignment is a mapping ``slot name -> method``. Its JSON form is

.. code-block:: json

    {"model": "fmnist-deit-tiny", "bits": 8, "strategy": "sqnr_diff",
     "default": {"softmax": "ivit"},
     "slots": {"blocks.0.attn.softmax": "ibert", "blocks.0.norm1": "ivit"}}

where ``default`` (optional, per op) fills the slots that ``slots`` does not name: per-layer
settings override per-op ones (the layering of ``torch.ao``'s ``QConfigMapping``). A file that
holds a bare ``{"slot": "method"}`` mapping is read too. Methods with per-slot parameters (the
``index`` softmax's ``K`` and ``T``) add a section ``"params": {"blocks.0.attn.softmax#index.K": 16}``;
in memory the parameters sit in the same mapping as the methods, under those keys. Per-layer
bit-widths and group counts go to ``"layer_bits"`` and ``"layer_groups"`` (layer -> value); in memory
they are ``<layer>@bits`` and ``<layer>@groups`` keys (:func:`mnq_search.slot.split_layer_keys`).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .budget import LAYER_BITS, bits_pair, bits_value
from .errors import UsageError
from .io import atomic_write_json, read_json
from .methods import OPS
from .slot import (
    bits_key,
    groups_key,
    method_params,
    methods_for,
    split_layer_keys,
    split_param_key,
)


def split_assignment(assignment: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """(slot -> method, parameter key -> value) of an assignment (bit-width and group keys left out:
    :func:`mnq_search.slot.split_layer_keys`)."""
    rest = split_layer_keys(assignment)[0]
    methods = {k: v for k, v in rest.items() if split_param_key(k) is None}
    return methods, {k: v for k, v in rest.items() if k not in methods}


def validate_assignment(assignment: Mapping[str, str], slot_ops: Mapping[str, str]) -> None:
    """Raise a one-line UsageError for an unknown slot, a method invalid for the slot's op, or a
    method parameter the method does not declare (or a value outside its choices)."""
    for name, method in assignment.items():
        key = split_param_key(name)
        if key is not None:
            _validate_param(key, method, slot_ops)
            continue
        if name not in slot_ops:
            close = difflib.get_close_matches(name, list(slot_ops), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown slot {name!r}{hint}; the model has {len(slot_ops)} slots, "
                             f"e.g. {', '.join(list(slot_ops)[:3])}")
        op = slot_ops[name]
        valid = methods_for(op, include_float=True)
        if method not in valid:
            raise UsageError(f"method {method!r} is not valid for {op} slot {name!r}; choose from: {', '.join(valid)}")


def _validate_param(key: tuple[str, str, str], value: Any, slot_ops: Mapping[str, str]) -> None:
    slot, method, param = key
    if slot not in slot_ops:
        raise UsageError(f"unknown slot {slot!r} in parameter {slot}#{method}.{param}")
    op = slot_ops[slot]
    if method not in methods_for(op):
        raise UsageError(f"method {method!r} of parameter {slot}#{method}.{param} is not valid for {op} slot "
                         f"{slot!r}; choose from: {', '.join(methods_for(op))}")
    params = method_params(op, method)
    if param not in params:
        raise UsageError(f"{method} {op} has no parameter {param!r}"
                         + (f"; choose from: {', '.join(params)}" if params else " (it declares none)"))
    if value not in params[param]:
        raise UsageError(f"{value!r} is not a choice of {slot}#{method}.{param}; "
                         f"choose from: {', '.join(map(str, params[param]))}")


def counts(assignment: Mapping[str, str], slot_ops: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Slots per op x method, as in the paper's Table 3 (every method of the op listed, zeros too;
    method parameters are not counted)."""
    table = {op: {m: 0 for m in methods_for(op, include_float=True)} for op in OPS}
    for name, method in split_assignment(assignment)[0].items():
        table[slot_ops[name]][method] += 1
    return {op: {m: n for m, n in row.items() if m != "float" or n} for op, row in table.items()}


def save_assignment(path: str | Path, assignment: Mapping[str, str], **meta: Any) -> None:
    methods, params = split_assignment(assignment)
    _, bits, groups = split_layer_keys(assignment)
    atomic_write_json(path, {**meta, "slots": methods, **({"params": params} if params else {}),
                             **({"layer_bits": bits} if bits else {}), **({"layer_groups": groups} if groups else {})})


def load_assignment(path: str | Path, slot_ops: Mapping[str, str]) -> tuple[dict[str, str], dict[str, Any]]:
    """Read an assignment file and resolve it against a model's slots; returns (assignment, metadata)."""
    data = read_json(path, "assignment file")
    if not isinstance(data, dict):
        raise UsageError(f"assignment file {path} must hold a JSON object")
    if "slots" in data or "default" in data:
        slots = data.get("slots", {})
        default = data.get("default", {})
        params = data.get("params", {})
        meta = {k: v for k, v in data.items() if k not in ("slots", "default", "params")}
    else:
        slots, default, params, meta = data, {}, {}, {}
    if not isinstance(slots, dict) or not isinstance(default, dict) or not isinstance(params, dict):
        raise UsageError(f"assignment file {path}: 'slots', 'default' and 'params' must be objects")
    if any(split_param_key(k) is None for k in params):
        bad = next(k for k in params if split_param_key(k) is None)
        raise UsageError(f"assignment file {path}: parameter key {bad!r} is not <slot>#<method>.<param>")
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
    validate_assignment(params, slot_ops)
    layer_bits = meta.pop("layer_bits", {})
    if not isinstance(layer_bits, dict) or not all(bits_pair(b) is not None for b in layer_bits.values()):
        raise UsageError(f"assignment file {path}: 'layer_bits' must map weight layers to bit-widths in "
                         f"{LAYER_BITS[0]}..{LAYER_BITS[1]} or 'wXaY' (X-bit weights, Y-bit inputs)")
    layer_groups = meta.pop("layer_groups", {})
    if not isinstance(layer_groups, dict) or not all(_valid_group_setting(g) for g in layer_groups.values()):
        raise UsageError(f"assignment file {path}: 'layer_groups' must map group layers to a group count >= 1 "
                         "or 'channel'")
    return {**{n: resolved[n] for n in slot_ops}, **params,
            **{bits_key(k): bits_value(*bits_pair(v)) for k, v in layer_bits.items()},
            **{groups_key(k): v for k, v in layer_groups.items()}}, meta


def _valid_group_setting(g: object) -> bool:
    return g == "channel" or (isinstance(g, int) and not isinstance(g, bool) and g >= 1)
