"""Integer-operation cost of an assignment, from per-method operation counts.

Each method family declares, in its own file (:class:`mnq_search.methods.Family` ``cost``), the
integer operations of each of its kernels per element of the slot's input and per row (the last
dimension: a softmax row of attention logits, one token's channels for GELU and LayerNorm), by kind:
``add`` (add, subtract, negate, one step of a sum), ``mul``, ``shift``, ``div`` (integer division),
``compare`` (max, min, one clamp bound, comparison, select, logical and, abs, sign), ``lookup`` (a
table lookup or a count-leading-zeros), counted from the integer path; constants derived from
calibrated scales are free, and so is a kernel's prescale. :data:`DEFAULT_WEIGHTS` gives each kind's
relative cost. The cost of one slot is ``elements * sum(w * element counts) + rows * sum(w * row
counts)``, with ``elements`` and ``rows`` measured per image on the model itself (one float forward
pass at :meth:`CostObjective.setup`); the cost of an assignment is the sum over slots, in millions
(``cost_mop``: weighted mega-operations per image). Without a model (unit use) every slot counts
one element and one row.

A file given with ``--cost-table`` overrides what it names, e.g. ``{"weights": {"div": 40}}`` or
``{"methods": {"softmax": {"ivit": {"element": {"div": 0}}}}}``. Anything else (unknown op, method,
section or kind; a negative or non-numeric count) is a one-line error naming the key. A family
that declares no cost for one of its methods is an error when an assignment uses that method
(never a silent 0).

Example:
    >>> from objectives.cost import CostObjective
    >>> obj = CostObjective()
    >>> slot_ops = {"blocks.0.attn.softmax": "softmax"}
    >>> obj.evaluate({"blocks.0.attn.softmax": "ibert"}, slot_ops=slot_ops) > 0
    True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from mnq_search.errors import UsageError, unknown_choice
from mnq_search.io import read_json
from mnq_search.methods import COST_KINDS as KINDS
from mnq_search.methods import COST_SECTIONS as SECTIONS
from mnq_search.methods import OPS, get_family
from mnq_search.plan import split_assignment
from mnq_search.slot import methods_for

from ._base import Objective
from ._registry import register_objective

DEFAULT_WEIGHTS = {"add": 1.0, "shift": 1.0, "compare": 1.0, "mul": 3.0, "div": 20.0, "lookup": 1.0}
TOP_KEYS = ("weights", "methods")


def _number(value: Any, where: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"cost table {source}: {where} must be a number >= 0, got {value!r}")
    return float(value)


def _check_keys(obj: Any, allowed: tuple[str, ...], where: str, source: str) -> dict:
    if not isinstance(obj, dict):
        raise UsageError(f"cost table {source}: {where} must be a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in allowed and not key.startswith("_"):  # "_doc" and the like are comments
            raise UsageError(f"cost table {source}: {str(unknown_choice(f'key in {where}', key, allowed))}")
    return obj


def _merge(base: dict, override: Any, source: str) -> dict:
    """Validate ``override`` (the file's JSON) and lay it over ``base`` (a full table)."""
    out = copy.deepcopy(base)
    _check_keys(override, TOP_KEYS, "the top level", source)
    for kind, w in _check_keys(override.get("weights", {}), KINDS, "weights", source).items():
        if not kind.startswith("_"):
            out["weights"][kind] = _number(w, f"weights.{kind}", source)
    for op, methods in _check_keys(override.get("methods", {}), OPS, "methods", source).items():
        if op.startswith("_"):
            continue
        for method, sections in _check_keys(methods, methods_for(op), f"methods.{op}", source).items():
            if method.startswith("_"):
                continue
            where = f"methods.{op}.{method}"
            entry = out["methods"][op].get(method) or {s: {k: 0.0 for k in KINDS} for s in SECTIONS}
            for section, counts in _check_keys(sections, SECTIONS, where, source).items():
                if section.startswith("_"):
                    continue
                for kind, n in _check_keys(counts, KINDS, f"{where}.{section}", source).items():
                    if not kind.startswith("_"):
                        entry[section][kind] = _number(n, f"{where}.{section}.{kind}", source)
            out["methods"][op][method] = entry
    return out


def default_cost_table() -> dict:
    """:data:`DEFAULT_WEIGHTS` and every registered method's declared counts (None where a family
    declares none for one of its methods)."""
    methods: dict[str, dict[str, Any]] = {}
    for op in OPS:
        methods[op] = {}
        for family in methods_for(op):
            declared = get_family(family).cost.get(op)
            methods[op][family] = None if declared is None else {
                s: {k: float(declared.get(s, {}).get(k, 0)) for k in KINDS} for s in SECTIONS}
    return {"weights": dict(DEFAULT_WEIGHTS), "methods": methods}


def load_cost_table(path: str | Path | None = None) -> dict:
    """The default table, overridden by the file at ``path`` if given; every count a float."""
    table = default_cost_table()
    return table if path is None else _merge(table, read_json(path, "cost table"), str(path))


def method_cost(table: Mapping, op: str, method: str) -> tuple[float, float]:
    """Weighted operations of one method: (per element, per row)."""
    w = table["weights"]
    entry = table["methods"][op].get(method)
    if entry is None:
        raise UsageError(f"the {method} family declares no cost for {op}: add it to the family's cost "
                         "or pass --cost-table FILE")
    return tuple(sum(w[k] * entry[s][k] for k in KINDS) for s in SECTIONS)  # type: ignore[return-value]


@torch.inference_mode()
def slot_geometry(qmodel, batches, device) -> dict[str, tuple[int, int]]:
    """Elements and rows per image of every slot's input: one float forward pass of one image."""
    model = copy.deepcopy(qmodel).set_quant(False).eval()
    shapes: dict[str, tuple[int, ...]] = {}

    def record(mod, args) -> None:  # a pre-hook returning a value would replace the input
        shapes.setdefault(mod.name, tuple(args[0].shape))

    hooks = [slot.register_forward_pre_hook(record) for slot in model.slots.values()]
    try:
        x, _ = next(iter(batches))
        model(x[:1].to(device))
    finally:
        for h in hooks:
            h.remove()
    # one image went in, so the whole tensor is per image (Swin folds its windows into dim 0)
    return {name: (math.prod(s), math.prod(s[:-1])) for name, s in shapes.items()}


@register_objective("cost")
class CostObjective(Objective):
    """Weighted integer operations per image of the assignment, in millions (lower is better).

    Args:
        table: a cost table file overriding the defaults (the families' declared counts).
    """

    direction = "minimize"
    metric = "cost_mop"
    description = "integer-operation cost per image (Mop, weighted) from a per-method cost table"

    def __init__(self, table: str | Path | None = None):
        self.table = load_cost_table(table)
        self.geometry: dict[str, tuple[int, int]] | None = None

    @classmethod
    def from_options(cls, options):
        return cls(getattr(options, "cost_table", None))

    def setup(self, ctx) -> None:
        self.geometry = slot_geometry(ctx.qmodel, ctx.calib_batches(1, 1), ctx.device)

    def evaluate(self, assignment, ctx=None, trial=None, slot_ops: Mapping[str, str] | None = None) -> float:
        slot_ops = slot_ops if slot_ops is not None else ctx.slot_ops
        total = 0.0
        for slot, method in split_assignment(assignment)[0].items():  # method parameters cost nothing
            per_elem, per_row = method_cost(self.table, slot_ops[slot], method)
            elems, rows = (self.geometry or {}).get(slot, (1, 1))
            total += elems * per_elem + rows * per_row
        return total / 1e6
