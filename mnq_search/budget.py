"""The syntax of a BOPs budget, without torch: checked by the CLI before any heavy import.

A budget is either a uniform setting (``"w6a6"``: the BOPs of every weight layer at 6-bit weights and
6-bit activations, resolved against a model's MACs by :func:`mnq_search.mixprec.parse_budget`) or an
absolute count (``"2.5e9"``, ``"1.2G"``, ``"800M"``, an optional ``"BOPs"`` suffix). A uniform setting
may add a group count (``"w4a4g8"``: plus the overhead of 8 instance-aware groups at every group
layer, IGQ-ViT's budget; for a search over group counts, ``--joint-groups``).
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from mnq_search.errors import UsageError

_UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
_UNIFORM = re.compile(r"w(\d+)a(\d+)(?:g(\d+))?", re.IGNORECASE)
_ABSOLUTE = re.compile(r"([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)\s*(?:bops)?", re.IGNORECASE)
MAX_BITS = 32
# Bit-widths one weight layer may take (--search-bits, layer_bits in assignment files); the model-wide
# --bits stays in 4..8, where every non-linear method is defined.
LAYER_BITS = (2, 8)


def valid_layer_bits(b: object) -> bool:
    """Whether ``b`` is a bit-width a single weight layer may take."""
    return isinstance(b, int) and not isinstance(b, bool) and LAYER_BITS[0] <= b <= LAYER_BITS[1]


# A weight layer's bits as one value (an assignment's ``<layer>@bits``, an assignment file's
# ``layer_bits``, a search variable's choice): ``b`` for b-bit weights and inputs, ``"wXaY"`` for X-bit
# weights and Y-bit inputs.
_PAIR = re.compile(r"w(\d+)a(\d+)", re.IGNORECASE)


def bits_value(w: int, a: int) -> int | str:
    """The one-value form of (weight bits, activation bits): ``w`` when equal, else ``"w{w}a{a}"``."""
    return int(w) if w == a else f"w{int(w)}a{int(a)}"


def bits_pair(value: object) -> tuple[int, int] | None:
    """(weight bits, activation bits) of a one-value form (``6``, ``"6"`` or ``"w4a8"``), None when it is
    not one or a bit-width lies outside :data:`LAYER_BITS`."""
    if isinstance(value, str):
        m = _PAIR.fullmatch(value.strip())
        if m:
            pair = (int(m.group(1)), int(m.group(2)))
        elif value.strip().isdigit():
            pair = (int(value), int(value))
        else:
            return None
    elif valid_layer_bits(value):
        pair = (value, value)
    else:
        return None
    return pair if all(valid_layer_bits(b) for b in pair) else None


def parse_search_bits(text: str, flag: str = "--search-bits") -> tuple[tuple[int, int], ...]:
    """Comma-separated candidates (``4,5,6,8``, or with separate input bits ``w4a8,w6a6,w8a8``) as
    sorted, distinct (weight, activation) pairs; a one-line :class:`UsageError` otherwise."""
    pairs = [bits_pair(item) for item in str(text).split(",")]
    if not pairs or any(p is None for p in pairs):
        raise UsageError(f"{flag}: expected comma-separated bit-widths in {LAYER_BITS[0]}..{LAYER_BITS[1]} "
                         f"like 4,5,6,8 or pairs like w4a8,w6a6, got {text!r}")
    return tuple(sorted(set(pairs)))


class BudgetSpec(NamedTuple):
    """A parsed budget: ``bits`` (w, a) for a uniform setting (and ``groups``, its group count, or
    None), else ``bops`` per image."""

    bits: tuple[int, int] | None
    bops: float | None
    groups: int | None = None


def parse_budget_spec(text: object) -> BudgetSpec:
    """Parse a budget string; a one-line :class:`UsageError` for anything else."""
    s = str(text).strip()
    uniform = _UNIFORM.fullmatch(s)
    if uniform:
        w, a = int(uniform.group(1)), int(uniform.group(2))
        if not (1 <= w <= MAX_BITS and 1 <= a <= MAX_BITS):
            raise UsageError(f"budget {text!r}: bits must be in 1..{MAX_BITS}")
        groups = None if uniform.group(3) is None else int(uniform.group(3))
        if groups is not None and groups < 1:
            raise UsageError(f"budget {text!r}: the group count must be >= 1")
        return BudgetSpec((w, a), None, groups)
    absolute = _ABSOLUTE.fullmatch(s)
    if absolute:
        value = float(absolute.group(1)) * _UNITS[absolute.group(2).lower()]
        if value > 0 and math.isfinite(value):
            return BudgetSpec(None, value)
    raise UsageError(f"bad budget {text!r}: use a uniform setting like 'w6a6' (or 'w4a4g8' with groups) or a "
                     "positive BOPs count like '2.5e9' or '1.2G'")
