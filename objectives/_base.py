"""What an objective is: a number to minimize or maximize.

- :class:`LayerScore` scores one ``(slot, method)`` pair from its row of the sensitivity table
  (``asqnr_in``, ``asqnr_out``, ``sqnr_diff``); greedy strategies pick, per slot, the method with
  the best score, treating layers as independent (paper section 3.2).
- :class:`Objective` scores a whole assignment (every slot at once) for joint search: a study
  (``strategies/optuna_joint.py``) evaluates one assignment per trial.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from mnq_search.context import RunContext
    from mnq_search.convert import QuantModel

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


class Objective(ABC):
    """A score of a whole assignment: the model with those methods in its slots, as a whole.

    Subclasses set ``direction``, ``metric`` (the study's name for the value) and ``description``,
    and implement :meth:`evaluate`. The context ``ctx`` is the run's
    :class:`~mnq_search.context.RunContext`: its settings, search space, slots, seed and bits, the
    float timm ``model``, the converted, uncalibrated ``qmodel``, the ``data`` source and the
    ``device``.

    Hooks: :meth:`from_options` builds the objective from the search options (before any model is
    loaded, so a bad option fails first); :meth:`setup` runs once before the first trial.

    Example:
        >>> from objectives import Objective, get_objective
        >>> cost = get_objective("cost", Objective)()
        >>> cost.direction, cost.metric
        ('minimize', 'cost_mop')
    """

    name: ClassVar[str] = ""
    direction: ClassVar[str] = "minimize"
    metric: ClassVar[str] = ""
    description: ClassVar[str] = ""

    @classmethod
    def from_options(cls, options: Any) -> "Objective":
        """Build from a :class:`~mnq_search.search.SearchOptions` (default: no arguments)."""
        return cls()

    def validation_images(self, settings) -> int:
        """Images of the validation split this objective scores on (0: none)."""
        return 0

    def setup(self, ctx: RunContext) -> None:
        """Optional hook, run once before the first trial (e.g. the float model's logits)."""

    @abstractmethod
    def evaluate(self, assignment: Mapping[str, str], ctx: RunContext, trial: Any = None) -> float:
        """The value of ``assignment`` (a method for every slot). ``trial`` is the Optuna trial, for
        objectives that report intermediate values to a pruner (None outside a study)."""

    @property
    def worst(self) -> float:
        """The value given to an assignment whose model cannot run (an integer overflow)."""
        return math.inf if self.direction == "minimize" else -math.inf

    def better(self, a: float, b: float) -> bool:
        """True when value ``a`` is strictly better than ``b``."""
        return a < b if self.direction == "minimize" else a > b

    @staticmethod
    def calibrated(assignment: Mapping[str, str], ctx: RunContext) -> "QuantModel":
        """A calibrated copy of the run's converted model with ``assignment``, on the run's
        calibration images (the same images and batches as the pipeline's final calibration)."""
        return ctx.calibrated(dict(assignment))
