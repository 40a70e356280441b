"""SQNR-diff scores (paper Eq. 11: ASQNR(out) - ASQNR(in)) and the two readings of its rule.

The paper selects "the method with the lowest SQNR diff" yet reports positive best values, so
the intended direction is unclear; the three scores below are the literal rule and its
alternatives, and the studies decide which one works.
"""

from __future__ import annotations

from ._base import LayerScore
from ._registry import register_objective


@register_objective("sqnr_diff")
class SqnrDiffScore(LayerScore):
    """The paper's rule as printed: lowest SQNR diff."""

    direction = "minimize"
    description = "lowest SQNR diff (the paper's rule as printed)"

    def score(self, row):
        return float(row["sqnr_diff"])


@register_objective("sqnr_gain")
class SqnrGainScore(LayerScore):
    """Highest SQNR diff: the method that loses the least SQNR through the layer."""

    direction = "maximize"
    description = "highest SQNR diff (least SQNR lost through the layer)"

    def score(self, row):
        return float(row["sqnr_diff"])


@register_objective("sqnr_diff_abs")
class SqnrDiffAbsScore(LayerScore):
    """Lowest |SQNR diff|: the method that changes the SQNR least, either way."""

    direction = "minimize"
    description = "lowest |SQNR diff| (changes the SQNR least)"

    def score(self, row):
        return abs(float(row["sqnr_diff"]))
