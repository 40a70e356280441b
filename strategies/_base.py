"""What a strategy is: something that chooses a value for every variable of the search space.

A strategy receives the run's :class:`~mnq_search.context.RunContext` (the settings, the search
space, the model's slots and their ops, the seed, the models and data, and, for strategies that ask
for it with ``needs_sensitivity``, the sensitivity table) and returns a :class:`StrategyResult`,
which the pipeline writes. Most strategies implement :meth:`Strategy.select` only; optional hooks
run before and after it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from mnq_search.context import RunContext


@dataclass
class StrategyResult:
    """The assignment and what a search adds to the run's files: ``search`` is written to
    ``search.json`` and folded into ``result.json``, ``pareto`` to ``pareto.json``."""

    assignment: dict[str, str]
    search: dict[str, Any] | None = None
    pareto: dict[str, Any] | None = None


class Strategy(ABC):
    """Base class. Subclasses set ``description`` and implement :meth:`select`.

    Args:
        arg: the part after ``:`` in a name like ``uniform:ibert`` (None when absent).
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    needs_sensitivity: ClassVar[bool] = False
    arg_choices: ClassVar[tuple[str, ...]] = ()  # non-empty: the strategy takes ``name:arg``
    free_arg: ClassVar[bool] = False  # True: ``name`` or ``name:<anything check_arg accepts>``

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        """The arguments ``name:arg`` accepts (default: :attr:`arg_choices`; empty: no argument)."""
        return cls.arg_choices

    @classmethod
    def check_arg(cls, arg: str) -> None:
        """For a ``free_arg`` strategy: raise a one-line UsageError when ``arg`` is not valid."""

    def __init__(self, arg: str | None = None):
        self.arg = arg

    @property
    def full_name(self) -> str:
        return f"{self.name}:{self.arg}" if self.arg else self.name

    def validation_images(self, settings) -> int:
        """Images of the validation split this strategy selects on (0: none), so that the pipeline
        checks, before any work, that the data set has them."""
        return 0

    def before_search(self, ctx: RunContext) -> None:
        """Optional hook, run before :meth:`select`."""

    @abstractmethod
    def select(self, ctx: RunContext) -> dict[str, str]:
        """Return a method for every slot in ``ctx.slot_ops``."""

    def after_search(self, ctx: RunContext, assignment: dict[str, str]) -> None:
        """Optional hook, run after :meth:`select`."""

    def result(self, ctx: RunContext, assignment: dict[str, str]) -> StrategyResult:
        """What :meth:`run` returns (override to add a search summary or a Pareto front)."""
        return StrategyResult(assignment)

    def run(self, ctx: RunContext) -> StrategyResult:
        """The hooks and :meth:`select`, as the pipeline calls them."""
        self.before_search(ctx)
        assignment = self.select(ctx)
        self.after_search(ctx, assignment)
        return self.result(ctx, assignment)
