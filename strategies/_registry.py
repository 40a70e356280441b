"""Strategies by name. A name may carry an argument (``uniform:ibert``)."""

from __future__ import annotations

from mnq_search.errors import UsageError, unknown_choice

from ._base import Strategy

_STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(name: str):
    def add(cls: type[Strategy]) -> type[Strategy]:
        if name in _STRATEGIES:
            raise ValueError(f"strategy {name!r} registered twice")
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return add


def list_strategies() -> list[str]:
    """Every usable strategy name, arguments spelled out (``uniform:ibert``, ...)."""
    out = []
    for name, cls in _STRATEGIES.items():
        out += [f"{name}:{a}" for a in cls.choices()] if cls.choices() else [name]
    return out


def get_strategy(spec: str) -> Strategy:
    """Build the strategy named ``spec`` (``name`` or ``name:arg``)."""
    name, _, arg = spec.partition(":")
    if name not in _STRATEGIES:
        raise unknown_choice("strategy", spec, list_strategies())
    cls = _STRATEGIES[name]
    if cls.choices():
        if arg not in cls.choices():
            raise unknown_choice(f"argument of strategy {name}", arg or "(none)",
                                 [f"{name}:{a}" for a in cls.choices()])
    elif arg and cls.free_arg:
        cls.check_arg(arg)
    elif arg:
        raise UsageError(f"strategy {name!r} takes no argument (got {spec!r})")
    return cls(arg or None)
