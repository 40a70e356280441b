"""A seeded random assignment: the baseline every search must beat."""

from __future__ import annotations

import random

from mnq_search.context import RunContext

from ._base import Strategy
from ._registry import register_strategy


@register_strategy("random")
class RandomStrategy(Strategy):
    """Each slot draws one of its op's methods uniformly, from ``random.Random(seed)``, in slot order."""

    description = "a uniformly random method per slot (seeded)"

    def select(self, ctx: RunContext) -> dict[str, str]:
        return ctx.search_space.random(random.Random(ctx.seed))
