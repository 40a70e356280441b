"""One method family everywhere: the single-method baselines of the paper (I-BERT, FQ-ViT, I-ViT,
and any registered family)."""

from __future__ import annotations

from mnq_search.methods import list_families, uniform_assignment

from mnq_search.context import RunContext

from ._base import Strategy
from ._registry import register_strategy


@register_strategy("uniform")
class UniformStrategy(Strategy):
    """``uniform:<family>``: that family in every slot, its declared stand-in where it has no method
    for an op (FQ-ViT keeps GELU in float; ``uniform:fqvit`` uses I-BERT's i-GELU there)."""

    description = "one family in every slot (a family's stand-in where it has no method, e.g. FQ-ViT's GELU)"

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        return list_families()

    def select(self, ctx: RunContext) -> dict[str, str]:
        return uniform_assignment(self.arg, ctx.slot_ops)
