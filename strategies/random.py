"""A seeded random assignment: the baseline every search must beat."""

from __future__ import annotations

import random

from mnq_search.slot import methods_for

from ._base import SearchContext, Strategy
from ._registry import register_strategy


@register_strategy("random")
class RandomStrategy(Strategy):
    """Each slot draws one of its op's methods uniformly, from ``random.Random(seed)``, in slot order."""

    description = "a uniformly random method per slot (seeded)"

    def select(self, ctx: SearchContext) -> dict[str, str]:
        rng = random.Random(ctx.seed)
        return {slot: rng.choice(methods_for(op)) for slot, op in ctx.slot_ops.items()}
