"""What a strategy is: something that picks a method for every slot.

A strategy receives a :class:`SearchContext` (the model's slots and their ops, the seed, and,
for strategies that ask for it with ``needs_sensitivity``, the sensitivity table) and returns an
assignment ``slot -> method``. Optional hooks run before and after the search.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass
class SearchContext:
    slot_ops: dict[str, str]
    seed: int = 0
    bits: int = 8
    sensitivity: list[dict] | None = None  # rows: slot, op, method, asqnr_in, asqnr_out, sqnr_diff
    extra: dict[str, Any] = field(default_factory=dict)  # strategy-specific inputs (e.g. evaluators)


class Strategy(ABC):
    """Base class. Subclasses set ``description`` and implement :meth:`select`.

    Args:
        arg: the part after ``:`` in a name like ``uniform:ibert`` (None when absent).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_sensitivity: ClassVar[bool] = False
    arg_choices: ClassVar[tuple[str, ...]] = ()  # non-empty: the strategy takes ``name:arg``

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        """The arguments ``name:arg`` accepts (default: :attr:`arg_choices`; empty: no argument)."""
        return cls.arg_choices

    def __init__(self, arg: str | None = None):
        self.arg = arg

    @property
    def full_name(self) -> str:
        return f"{self.name}:{self.arg}" if self.arg else self.name

    def before_search(self, ctx: SearchContext) -> None:
        """Optional hook, run before :meth:`select`."""

    @abstractmethod
    def select(self, ctx: SearchContext) -> dict[str, str]:
        """Return a method for every slot in ``ctx.slot_ops``."""

    def after_search(self, ctx: SearchContext, assignment: dict[str, str]) -> None:
        """Optional hook, run after :meth:`select`."""
