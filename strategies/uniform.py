"""One method family everywhere: the single-method baselines of the paper (I-BERT, FQ-ViT, I-ViT)."""

from __future__ import annotations

from mnq_search.sensitivity import UNIFORM_GELU_FOR_FQVIT, uniform_for

from ._base import SearchContext, Strategy
from ._registry import register_strategy


@register_strategy("uniform")
class UniformStrategy(Strategy):
    """``uniform:<family>``: that family in every slot. FQ-ViT has no integer GELU (it keeps GELU in
    float); ``uniform:fqvit`` uses I-BERT's i-GELU there, since FQ-ViT's Log-Int-Softmax builds on
    I-BERT's i-exp: the polynomial family is its closest integer relative."""

    arg_choices = ("ibert", "fqvit", "ivit")
    description = f"one family in every slot (uniform:fqvit uses {UNIFORM_GELU_FOR_FQVIT} for GELU)"

    def select(self, ctx: SearchContext) -> dict[str, str]:
        return uniform_for(self.arg, ctx.slot_ops)
