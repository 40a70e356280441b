"""What an objective is: a number to minimize or maximize.

- :class:`LayerScore` scores one ``(slot, method)`` pair from its row of the sensitivity table
  (``asqnr_in``, ``asqnr_out``, ``sqnr_diff``); greedy strategies pick, per slot, the method with
  the best score, treating layers as independent (paper section 3.2).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

DIRECTIONS = ("minimize", "maximize")


class LayerScore(ABC):
    """A per-slot score of a method, from the sensitivity row of that slot and method."""

    name: ClassVar[str] = ""
    direction: ClassVar[str] = "minimize"
    description: ClassVar[str] = ""

    @abstractmethod
    def score(self, row: Mapping[str, float]) -> float:
        """The score of one sensitivity row (keys ``asqnr_in``, ``asqnr_out``, ``sqnr_diff``)."""

    def better(self, a: float, b: float) -> bool:
        """True when score ``a`` is strictly better than ``b``."""
        return a < b if self.direction == "minimize" else a > b
