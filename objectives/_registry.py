"""Objectives by name (a decorator fills the registry; duplicates are refused)."""

from __future__ import annotations

from mnq_search.errors import unknown_choice

_OBJECTIVES: dict[str, type] = {}


def register_objective(name: str):
    def add(cls):
        if name in _OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        cls.name = name
        _OBJECTIVES[name] = cls
        return cls

    return add


def list_objectives(kind: type | None = None) -> list[str]:
    return sorted(n for n, c in _OBJECTIVES.items() if kind is None or issubclass(c, kind))


def get_objective(name: str, kind: type | None = None):
    """The objective class registered as ``name`` (of base class ``kind`` if given)."""
    names = list_objectives(kind)
    if name not in names:
        raise unknown_choice("objective", name, names)
    return _OBJECTIVES[name]
