"""Short-QAT objective: a few quantization-aware training steps, then top-1 on validation images
(never the test split).

A trial calibrates a copy of the model with the assignment, trains it for ``steps`` optimizer steps
(:func:`mnq_search.qat.train_qat`, the run's QAT settings ``RunSettings.qat`` otherwise)
on the training split minus the validation split, and returns the top-1 (percent) on ``holdout``
images of the validation split: the same images whatever the seed (``DataSource.validation_batches``).
Every evaluation during training is reported to the trial (``trial.report(top1, step)``), so a
pruner (median, successive halving) can stop a bad trial early; in a two-objective study Optuna
has no pruning, and the evaluations are kept in the trial's user attribute ``intermediate``.

Intermediate evaluations come every ``eval_every`` steps (``--qat-eval-every``), at the end of
every epoch and at the end of the run; without ``eval_every`` a round shorter than an epoch
reports once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mnq_search.errors import UsageError

from ._base import Objective
from ._registry import register_objective


@register_objective("qat")
class QATObjective(Objective):
    """Top-1 (percent) on held-out training images after a short QAT round (higher is better).

    Args:
        steps: optimizer steps per trial.
        holdout: validation images the top-1 is measured on (at most the validation split).
        eval_every: evaluate (and report to the pruner) every this many steps (None: per epoch and
            at the end).
    """

    direction = "maximize"
    metric = "top1_holdout"
    description = "top-1 on held-out training images after a short QAT round (reports to a pruner)"

    def __init__(self, steps: int = 100, holdout: int = 2000, eval_every: int | None = None):
        if steps <= 0:
            raise UsageError(f"--qat-steps must be positive, got {steps}")
        if holdout <= 0:
            raise UsageError(f"--qat-holdout must be positive, got {holdout}")
        if eval_every is not None and eval_every <= 0:
            raise UsageError(f"--qat-eval-every must be positive, got {eval_every}")
        self.steps, self.holdout, self.eval_every = steps, holdout, eval_every

    def validation_images(self, settings) -> int:
        return self.holdout

    @classmethod
    def from_options(cls, options):
        return cls(options.qat_steps, options.qat_holdout, options.qat_eval_every)

    def qat_config(self, ctx: Any):
        """The run's QAT settings for a round of ``steps`` steps (never on the validation split)."""
        changes = dict(steps=self.steps, holdout=None, seed=ctx.seed)
        if self.eval_every is not None:
            changes["eval_every_steps"] = self.eval_every
        return ctx.qat_config(**changes)

    def evaluate(self, assignment: Mapping[str, str], ctx: Any, trial: Any = None) -> float:
        from mnq_search.qat import make_eval_fn, train_qat

        device, data = ctx.device, ctx.data
        qcfg = self.qat_config(ctx)
        model = self.calibrated(assignment, ctx)
        eval_fn = make_eval_fn(data, self.holdout, ctx.settings.batch_size, device, validation=True)
        seen: dict[int, float] = {}

        def on_eval(step: int, top1: float) -> None:
            seen[step] = top1
            if trial is None:
                return
            if len(trial.study.directions) == 1:
                import optuna

                trial.report(top1, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"top-1 {top1:.2f} % on the held-out images after {step} steps")
            else:  # Optuna has no report() for several objectives: keep the curve as an attribute
                trial.set_user_attr("intermediate", {str(k): v for k, v in seen.items()})

        train_qat(model, data, qcfg, device, None, teacher=ctx.model,
                  eval_fn=eval_fn, on_eval=on_eval, progress=False)
        if eval_fn.last is None:
            raise UsageError("the QAT round ended without an evaluation")
        return float(eval_fn.last["top1"])
