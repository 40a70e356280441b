"""Registries of method families and of their integer non-linear methods, and the factory
``make_nonlinear``.

A family is one file (``ibert.py``, ``fqvit.py``, ``ivit.py``, or a plug-in of your own) that
declares itself with :func:`register_family` (name, display title, colour, the paper, the
integer-operation cost of each of its kernels, and stand-ins for ops it has no method for) and
decorates its method classes with :func:`register_method`. Everything else (the uniform
strategies, the sensitivity pass, the cost objective, the report's labels and colours, the CLI's
tables) reads these registries, so importing the file is all a new family needs; an op the
family has no method for is simply not offered for it.

>>> from mnq_search.methods import list_families, NONLINEAR_METHODS
>>> list_families()
('ibert', 'fqvit', 'ivit')
>>> NONLINEAR_METHODS["gelu"]
('ibert', 'ivit')
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from ..errors import UsageError, unknown_choice
from ._base import NonLinearMethod

OPS = ("softmax", "gelu", "layernorm")
COST_KINDS = ("add", "mul", "shift", "div", "compare", "lookup")
COST_SECTIONS = ("element", "row")


@dataclass(frozen=True)
class Family:
    """What a method family declares about itself (its methods register separately).

    Args:
        name: registry key, lower_snake (``ibert``).
        title: display name (``I-BERT``).
        color: matplotlib colour of its bars and lines in the report.
        paper: the reference, one line.
        cost: per op, the integer operations of its kernel by kind (:data:`COST_KINDS`), per element
            of the input (``"element"``) and per row (``"row"``): what the cost objective counts.
        stand_ins: per op it has no method for, the family whose method ``uniform:<name>`` uses there
            (FQ-ViT keeps GELU in float; its uniform assignment takes I-BERT's i-GELU).
    """

    name: str
    title: str
    color: str
    paper: str = ""
    cost: Mapping[str, Mapping[str, Mapping[str, float]]] = field(default_factory=dict)
    stand_ins: Mapping[str, str] = field(default_factory=dict)


_FAMILIES: dict[str, Family] = {}
_METHODS: dict[tuple[str, str], type[NonLinearMethod]] = {}
#: op -> the method families available for it, e.g. ``NONLINEAR_METHODS["gelu"] == ("ibert", "ivit")``
NONLINEAR_METHODS: dict[str, tuple[str, ...]] = {op: () for op in OPS}


def register_family(family: Family) -> Family:
    """Declare a family (before its methods register); a second family of the same name is refused."""
    if family.name in _FAMILIES:
        raise ValueError(f"family {family.name!r} registered twice")
    for op, table in family.cost.items():
        if op not in OPS:
            raise unknown_choice(f"op in the cost of family {family.name}", op, OPS)
        for section, counts in table.items():
            if section not in COST_SECTIONS:
                raise unknown_choice(f"cost section of {family.name} {op}", section, COST_SECTIONS)
            for kind in counts:
                if kind not in COST_KINDS:
                    raise unknown_choice(f"operation kind in the cost of {family.name} {op}", kind, COST_KINDS)
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    """Remove a family and its methods (for plug-ins loaded temporarily, e.g. in tests)."""
    _FAMILIES.pop(name, None)
    for op in OPS:
        _METHODS.pop((op, name), None)
        NONLINEAR_METHODS[op] = tuple(m for m in NONLINEAR_METHODS[op] if m != name)


def list_families() -> tuple[str, ...]:
    """Registered families that have at least one method, in registration order."""
    return tuple(n for n in _FAMILIES if any((op, n) in _METHODS for op in OPS))


def get_family(name: str) -> Family:
    if name not in _FAMILIES:
        raise unknown_choice("method family", name, _FAMILIES)
    return _FAMILIES[name]


def uniform_assignment(family: str, slot_ops: Mapping[str, str]) -> dict[str, str]:
    """``uniform:<family>``: the family's method in every slot whose op it has, its declared stand-in
    elsewhere (``"float"`` is a valid method everywhere)."""
    fam = None if family == "float" else get_family(family)
    out = {}
    for name, op in slot_ops.items():
        if family == "float" or (op, family) in _METHODS:
            out[name] = family
        elif op in fam.stand_ins:
            out[name] = fam.stand_ins[op]
        else:
            raise UsageError(f"family {family!r} has no {op} method and declares no stand-in for it")
    return out


def register_method(op: str, family: str):
    """Class decorator registering a :class:`NonLinearMethod` for ``op`` under ``family`` (which
    must be declared first with :func:`register_family`)."""
    if op not in OPS:
        raise unknown_choice("op", op, OPS)

    def add(cls: type[NonLinearMethod]) -> type[NonLinearMethod]:
        if family not in _FAMILIES:
            raise ValueError(f"method {cls.__name__} names family {family!r}, which is not registered")
        if (op, family) in _METHODS:
            raise ValueError(f"method {family!r} for {op!r} registered twice")
        cls.op, cls.family = op, family
        _METHODS[(op, family)] = cls
        NONLINEAR_METHODS[op] = NONLINEAR_METHODS[op] + (family,)
        return cls

    return add


def get_method_class(op: str, method: str) -> type[NonLinearMethod]:
    if op not in OPS:
        raise unknown_choice("op", op, OPS)
    if (op, method) not in _METHODS:
        raise unknown_choice(f"{op} method", method, NONLINEAR_METHODS[op])
    return _METHODS[(op, method)]


def make_nonlinear(op: str, method: str, bits: int = 8, float_module: nn.Module | None = None,
                   fine_grid: bool = False, **params) -> NonLinearMethod:
    """Build the integer ``method`` for ``op``.

    Args:
        op: ``"softmax"`` (over the last dim), ``"gelu"`` or ``"layernorm"`` (over the last dim).
        method: a family in ``NONLINEAR_METHODS[op]``.
        bits: the model's activation bit-width (4..8).
        float_module: for LayerNorm, the ``nn.LayerNorm`` to copy (weight, bias, eps).
        fine_grid: exp/erf kernels on a grid no coarser than 2**-6 (see :class:`NonLinearMethod`).
        params: the method's per-slot parameters (:attr:`NonLinearMethod.PARAMS`), e.g. ``K=16``.

    Raises:
        ValueError: unknown op, method, bits or parameter value; the message names the valid choices.

    Example:
        >>> import torch
        >>> from mnq_search.methods import make_nonlinear
        >>> m = make_nonlinear("softmax", "ivit", bits=8)
        >>> s_x = torch.tensor(0.05)
        >>> x = torch.randint(-128, 128, (2, 3, 10)).float() * s_x
        >>> y, s_y = m(x, s_x)
        >>> bool(((y / s_y) == (y / s_y).round()).all())
        True
    """
    cls = get_method_class(op, method)
    check_params(cls, params)
    return cls(bits=bits, float_module=float_module, fine_grid=fine_grid, **params)


def check_params(cls: type[NonLinearMethod], params: Mapping[str, object]) -> None:
    """One-line UsageError for a parameter ``cls`` does not declare or a value outside its choices."""
    for name, value in params.items():
        if name not in cls.PARAMS:
            raise unknown_choice(f"parameter of {cls.family} {cls.op}", name, tuple(cls.PARAMS) or ("(none)",))
        if value not in cls.PARAMS[name]:
            raise UsageError(f"{value!r} is not a choice of {cls.family} {cls.op} parameter {name!r}; "
                             f"choose from: {', '.join(map(str, cls.PARAMS[name]))}")
