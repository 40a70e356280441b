"""The search space: the declared variables a strategy chooses values for.

Each :class:`Variable` has a name (unique in the space), a kind, its choices and its default. A
kind (:class:`VariableKind`, registered by name) says how values of that kind are applied to a
converted model and where they go in the assignment file. The kinds today are ``method`` (one per
non-linear slot: the integer method of the slot, choices from the method registry) and ``param``
(a per-slot parameter of a method, e.g. IndexSoftmax's table size, named
``<slot>#<method>.<param>``, default its first choice; it acts only while the slot runs that
method); bit-widths per weight layer and per Softmax/GELU slot and group counts per layer are further kinds. Strategies, objectives, the Optuna study and the cost
model read the space instead of op lists.

An assignment is a mapping ``variable name -> value``; for method variables the name is the slot's
(``blocks.0.attn.softmax``), which keeps today's assignment files as they are.

Example:
    >>> import timm
    >>> from mnq_search.convert import convert_model
    >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1)
    >>> space = SearchSpace.from_model(convert_model(vit, 8))
    >>> space["blocks.0.mlp.act"].choices
    ('ibert', 'ivit')
"""

from __future__ import annotations

import random as _random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import UsageError, unknown_choice

if TYPE_CHECKING:
    from .convert import QuantModel


@dataclass(frozen=True)
class Variable:
    """One search variable.

    Args:
        name: unique in the space (a method variable takes its slot's name).
        kind: the :class:`VariableKind` name (``method``).
        choices: the values it may take, in a stable order.
        default: the value when an assignment leaves it out (None: it must be given).
        group: what it belongs to, for strategies that treat variables by group (the slot's op).
    """

    name: str
    kind: str
    choices: tuple[Any, ...]
    default: Any = None
    group: str = ""


class VariableKind:
    """How variables of one kind reach a model and the assignment file. Subclass, set ``name``
    and ``file_key`` and implement :meth:`variables` and :meth:`apply`."""

    name: str = ""
    file_key: str = ""  # the assignment file's section for this kind's values

    def variables(self, qmodel: QuantModel, families: tuple[str, ...] | None = None, **options) -> list[Variable]:
        raise NotImplementedError

    def apply(self, qmodel: QuantModel, values: Mapping[str, Any]) -> None:
        raise NotImplementedError


_KINDS: dict[str, VariableKind] = {}


def register_kind(kind: VariableKind) -> VariableKind:
    if kind.name in _KINDS:
        raise ValueError(f"variable kind {kind.name!r} registered twice")
    _KINDS[kind.name] = kind
    return kind


def list_kinds() -> tuple[str, ...]:
    return tuple(_KINDS)


class _MethodKind(VariableKind):
    """The integer method of each non-linear slot; choices: the families with a method for the
    slot's op (:data:`mnq_search.methods.NONLINEAR_METHODS`)."""

    name = "method"
    file_key = "slots"

    def variables(self, qmodel, families=None, **options):
        return _method_variables(qmodel.slot_ops(), families)

    def apply(self, qmodel, values):
        qmodel.set_assignment(dict(values))


def _method_variables(slot_ops: Mapping[str, str], families: tuple[str, ...] | None) -> list[Variable]:
    from .methods import NONLINEAR_METHODS

    out = []
    for slot, op in slot_ops.items():
        choices = tuple(m for m in NONLINEAR_METHODS[op] if families is None or m in families)
        if not choices:
            raise UsageError(f"no family of {', '.join(families)} has a {op} method (slot {slot!r})")
        out.append(Variable(slot, "method", choices, None, op))
    return out


register_kind(_MethodKind())


class _ParamKind(VariableKind):
    """The per-slot parameters of the methods a slot may take (IndexSoftmax's ``K`` and ``T``),
    named ``<slot>#<method>.<param>``; a parameter acts only while its slot runs its method."""

    name = "param"
    file_key = "params"

    def variables(self, qmodel, families=None, **options):
        return _param_variables(qmodel.slot_ops(), families)

    def apply(self, qmodel, values):
        qmodel.set_assignment(dict(values))


def _param_variables(slot_ops: Mapping[str, str], families: tuple[str, ...] | None) -> list[Variable]:
    from .methods import NONLINEAR_METHODS
    from .slot import method_params, param_key

    out = []
    for slot, op in slot_ops.items():
        for method in NONLINEAR_METHODS[op]:
            if families is not None and method not in families:
                continue
            for param, choices in method_params(op, method).items():
                out.append(Variable(param_key(slot, method, param), "param", tuple(choices), choices[0], slot))
    return out


register_kind(_ParamKind())


class _BitsKind(VariableKind):
    """The bit-widths of each weight layer (Mix-QViT), named ``<layer>@bits``; choices: the ``bits``
    option (bit-widths for weights and inputs together, default 4, 5, 6, 8, or (weight, input) pairs,
    whose values are ``"wXaY"`` when they differ: :func:`mnq_search.budget.bits_value`) and the
    layer's current bits, its default. Only in spaces that ask for it (``--joint-bits``)."""

    name = "bits"
    file_key = "layer_bits"

    def variables(self, qmodel, families=None, bits=(4, 5, 6, 8), **options):
        from .budget import bits_value
        from .mixprec import layer_bits
        from .slot import bits_key

        pairs = {tuple(b) if isinstance(b, (tuple, list)) else (b, b) for b in bits}
        out = []
        for layer, current in layer_bits(qmodel).items():
            choices = sorted(pairs | {tuple(current)})
            out.append(Variable(bits_key(layer), "bits", tuple(bits_value(*p) for p in choices),
                                bits_value(*current), "bits"))
        return out

    def apply(self, qmodel, values):
        qmodel.set_assignment(dict(values))


register_kind(_BitsKind())


class _SlotBitsKind(VariableKind):
    """The bit-width of each Softmax and GELU slot (its input grid, and a Softmax's output grid:
    :meth:`mnq_search.slot.NonLinearSlot.set_bits`), named ``<slot>@bits`` like a weight layer's and
    kept in the same file section; choices: the ``nl_bits`` option (default 6, 8) and the slot's
    current bits, its default. LayerNorm slots have none (their input is the 16-bit residual). Only
    in spaces that ask for it (``--joint-nl-bits``)."""

    name = "nl_bits"
    file_key = "layer_bits"

    def variables(self, qmodel, families=None, nl_bits=(6, 8), **options):
        from .slot import bits_key

        return [Variable(bits_key(slot), "nl_bits", tuple(sorted(set(nl_bits) | {current})), current, "nl_bits")
                for slot, current in qmodel.slot_bits().items()]

    def apply(self, qmodel, values):
        qmodel.set_assignment(dict(values))


register_kind(_SlotBitsKind())


class _GroupsKind(VariableKind):
    """The instance-aware group count of each group layer (IGQ-ViT, :mod:`mnq_search.groups`): a block
    linear's input (named by the linear) or an attention's probabilities (named by its softmax slot),
    ``<layer>@groups``; choices: the ``groups`` option (default 1, 2, 4, 8, 16; a linear's only up to its
    input channels) and the layer's current setting, its default. Only in spaces that ask for it
    (``--joint-groups``)."""

    name = "groups"
    file_key = "layer_groups"

    def variables(self, qmodel, families=None, groups=(1, 2, 4, 8, 16), **options):
        from .groups import get_groups, group_layers
        from .slot import groups_key

        current = get_groups(qmodel)
        out = []
        for layer, (kind, mod) in group_layers(qmodel).items():
            limit = mod.linear.in_features if kind == "linear" else None
            counts = {g for g in groups if limit is None or g <= limit} | {current[layer]}
            choices = tuple(sorted(counts, key=lambda g: (isinstance(g, str), g if isinstance(g, int) else 0)))
            out.append(Variable(groups_key(layer), "groups", choices, current[layer], "groups"))
        return out

    def apply(self, qmodel, values):
        qmodel.set_assignment(dict(values))


register_kind(_GroupsKind())


class SearchSpace:
    """An ordered collection of variables (see the module docstring)."""

    def __init__(self, variables: list[Variable]):
        names = [v.name for v in variables]
        if len(set(names)) != len(names):
            raise ValueError("variable names must be unique in a search space")
        self._vars = {v.name: v for v in variables}

    @classmethod
    def from_model(cls, qmodel: QuantModel, kinds: tuple[str, ...] = ("method", "param"),
                   families: tuple[str, ...] | None = None, **options) -> "SearchSpace":
        """The variables of ``kinds`` that ``qmodel`` offers (default: a method per slot, from
        ``families`` or every registered family, and the per-slot parameters of those methods;
        ``"bits"`` adds a bit-width per weight layer, choices from the ``bits`` option, ``"nl_bits"`` one
        per Softmax and GELU slot, choices from the ``nl_bits`` option, ``"groups"`` a
        group count per group layer, choices from the ``groups`` option)."""
        out: list[Variable] = []
        for k in kinds:
            if k not in _KINDS:
                raise unknown_choice("variable kind", k, _KINDS)
            out += _KINDS[k].variables(qmodel, families, **options)
        return cls(out)

    @classmethod
    def of_slots(cls, slot_ops: Mapping[str, str], families: tuple[str, ...] | None = None) -> "SearchSpace":
        """Method variables for the slots ``slot_ops``, and their methods' parameters (no model needed)."""
        return cls(_method_variables(slot_ops, families) + _param_variables(slot_ops, families))

    def __iter__(self) -> Iterator[Variable]:
        return iter(self._vars.values())

    def __len__(self) -> int:
        return len(self._vars)

    def __getitem__(self, name: str) -> Variable:
        return self._vars[name]

    def __contains__(self, name: str) -> bool:
        return name in self._vars

    def variables(self, kind: str | None = None) -> list[Variable]:
        return [v for v in self._vars.values() if kind is None or v.kind == kind]

    @property
    def slot_ops(self) -> dict[str, str]:
        """Slot -> op of the method variables."""
        return {v.name: v.group for v in self.variables("method")}

    def validate(self, values: Mapping[str, Any], complete: bool = True) -> None:
        """One-line UsageError for an unknown variable, a value outside its choices, or (``complete``)
        a variable without a value or default."""
        for name, value in values.items():
            if name not in self._vars:
                raise unknown_choice("search variable", name, list(self._vars)[:50])
            var = self._vars[name]
            if value not in var.choices:
                raise UsageError(f"{value!r} is not a choice of {var.kind} variable {name!r}; "
                                 f"choose from: {', '.join(map(str, var.choices))}")
        if complete:
            missing = [v.name for v in self if v.name not in values and v.default is None]
            if missing:
                raise UsageError(f"the assignment leaves {len(missing)} variables without a value (e.g. {missing[0]!r})")

    def apply(self, qmodel: QuantModel, values: Mapping[str, Any]) -> None:
        """Set every variable's value on ``qmodel``, kind by kind."""
        for kind in dict.fromkeys(v.kind for v in self):
            _KINDS[kind].apply(qmodel, {v.name: values[v.name] for v in self.variables(kind) if v.name in values})

    def random(self, rng: _random.Random) -> dict[str, Any]:
        """One uniformly random choice per variable, drawn in the space's order (the parameters of
        methods a slot did not draw are drawn too, then left out: :meth:`active`)."""
        return self.active({v.name: rng.choice(v.choices) for v in self})

    def active(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` without the method parameters whose slot does not take their method."""
        from .slot import split_param_key

        out = {}
        for name, value in values.items():
            key = split_param_key(name)
            if key is None or values.get(key[0]) == key[1]:
                out[name] = value
        return out

    def complete(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """:meth:`active` ``values`` with the defaults of the parameters they leave out (a
        strategy that picks only methods runs them with their default parameters)."""
        from .slot import split_param_key

        out = self.active(values)
        for var in self:
            if var.kind == "param" and var.name not in out and out.get(var.group) == split_param_key(var.name)[1]:
                out[var.name] = var.default
            elif var.kind in ("bits", "nl_bits", "groups") and var.name not in out:
                out[var.name] = var.default
        return out

    def sections(self, values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """The assignment file's sections (``{"slots": {...}}``) for ``values``."""
        out: dict[str, dict[str, Any]] = {}
        for v in self:
            if v.name in values:
                out.setdefault(_KINDS[v.kind].file_key, {})[v.name] = values[v.name]
        return out
