"""Cheap whole-model objectives, no training: how far the quantized model's logits are from the
float model's on ``val_size`` images of the validation split (never the test split, and not the
calibration images the ranges were fitted on).

- ``proxy``: mean KL(float || quantized) of the softmaxed logits per image (lower is better);
- ``proxy_sqnr``: output SQNR of the logits in dB, 10 log10(sum f^2 / sum (f - q)^2) (higher is better).

Both calibrate a copy of the model with the assignment on the run's calibration images (as the
pipeline does for the final model) and compare on the validation images. The copy is an
:class:`~mnq_search.incremental.IncrementalEvaluator` (with one thread per worker; ``n_jobs`` > 1
calibrates a fresh copy per trial, as the evaluator's cached activations would multiply): a trial
recalibrates and recomputes only from the first block its assignment changes against the thread's
previous trial, on cached activations, with the same logits as a fresh calibration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ._base import Objective
from ._registry import register_objective

SQNR_CAP_DB = 300.0  # identical logits: a finite value the samplers can rank


@torch.inference_mode()
def _logits(model: torch.nn.Module, ctx: Any) -> list[torch.Tensor]:
    model.eval()
    return [model(x.to(ctx.device)).double().cpu() for x, _ in ctx.validation_batches(ctx.settings.val_size)]


class _LogitsObjective(Objective):
    """Shared part: the float logits once (:meth:`setup`), the quantized ones per trial."""

    def __init__(self) -> None:
        self._ref: list[torch.Tensor] | None = None
        self._evaluator = None  # the incremental evaluator (one thread per worker; see quant_logits)

    def validation_images(self, settings) -> int:
        return settings.val_size

    def setup(self, ctx: Any) -> None:
        self._ref = _logits(ctx.model, ctx)

    def evaluate(self, assignment: Mapping[str, str], ctx: Any, trial: Any = None) -> float:
        if self._ref is None:
            self.setup(ctx)
        value = self.compare(torch.cat(self._ref), torch.cat(self.quant_logits(assignment, ctx)))
        return self.worst if math.isnan(value) else value

    def quant_logits(self, assignment: Mapping[str, str], ctx: Any) -> list[torch.Tensor]:
        """The validation logits of the model calibrated with ``assignment`` (incrementally; with
        several threads per worker, a fresh copy per trial: each evaluator holds every block's
        activations of the calibration and validation images)."""
        from mnq_search.incremental import evaluator_for

        search = getattr(ctx.settings, "search", None)
        if search is not None and search.n_jobs > 1:
            return _logits(self.calibrated(assignment, ctx), ctx)
        if self._evaluator is None:
            self._evaluator = evaluator_for(ctx)
        ev = self._evaluator
        ev.score(dict(assignment))
        return [x.double().cpu() for x in ev.logits]

    def compare(self, ref: torch.Tensor, quant: torch.Tensor) -> float:
        raise NotImplementedError


@register_objective("proxy")
class ProxyKL(_LogitsObjective):
    """Mean over the validation images of KL(softmax(float) || softmax(quantized)), in nats."""

    direction = "minimize"
    metric = "kl"
    description = "mean KL(float || quantized) of the logits on validation images (no training)"

    def compare(self, ref, quant):
        kl = F.kl_div(F.log_softmax(quant, -1), F.log_softmax(ref, -1), reduction="sum", log_target=True)
        return float(kl) / ref.shape[0]


@register_objective("proxy_sqnr")
class ProxySqnr(_LogitsObjective):
    """Output SQNR of the logits over the validation images, in dB."""

    direction = "maximize"
    metric = "sqnr_db"
    description = "output SQNR (dB) of the logits on validation images (no training)"

    def compare(self, ref, quant):
        noise = float(((ref - quant) ** 2).sum())
        signal = float((ref**2).sum())
        if noise == 0:
            return SQNR_CAP_DB
        return min(SQNR_CAP_DB, 10.0 * math.log10(max(signal, 1e-300) / noise))
