"""What an objective is: a number to minimize or maximize.

- :class:`LayerScore` scores one ``(slot, method)`` pair from its row of the sensitivity table
  (``asqnr_in``, ``asqnr_out``, ``sqnr_diff``); greedy strategies pick, per slot, the method with
  the best score, treating layers as independent (paper section 3.2).
- :class:`Objective` scores a whole assignment (every slot at once) for joint search: a study
  (``strategies/optuna_joint.py``) evaluates one assignment per trial.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import copy
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
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
    and implement :meth:`evaluate`. The context ``ctx`` is the strategy's
    :class:`~strategies.SearchContext`: ``ctx.slot_ops``, ``ctx.seed``, ``ctx.bits`` and in
    ``ctx.extra`` the float timm ``model``, the converted, uncalibrated ``qmodel``, the ``data``
    source, the ``device`` and the run's ``config`` (:class:`~mnq_search.pipeline.RunConfig`).

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

    def setup(self, ctx: Any) -> None:
        """Optional hook, run once before the first trial (e.g. the float model's logits)."""

    @abstractmethod
    def evaluate(self, assignment: Mapping[str, str], ctx: Any, trial: Any = None) -> float:
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
    def calibrated(assignment: Mapping[str, str], ctx: Any) -> "QuantModel":
        """A calibrated copy of ``ctx.extra["qmodel"]`` with ``assignment``, on the run's calibration
        images (the same images, batches and seed as the pipeline's final calibration)."""
        from mnq_search.calibrate import calibrate

        cfg = ctx.extra["config"]
        model = copy.deepcopy(ctx.extra["qmodel"])
        model.set_quant(True)
        model.set_assignment(assignment)
        calibrate(model, ctx.extra["data"].calib_batches(cfg.calib_size, cfg.batch_size),
                  ctx.extra["device"])
        return model
