"""The ``vvtq`` QAT recipe: oscillation tracking and the variation-aware regulariser inside
:func:`mnq_search.qat.train_qat` (issue 16, part 3 of VVTQ; ``--qat-recipe vvtq``).

Every optimizer step, the integer weights of every weight layer (block linears, patch embedding,
head) are recorded by an :class:`OscillationTracker` (a flip: the integer moves up then down, or
down then up). The loss gets ``R = strength(t) * sum_m v_m * mean(d_m ** 2)``
(:func:`variation_aware_regularizer`), where ``d_m`` is each latent weight's distance to its grid
point in steps of its channel's scale, ``v_m`` the module's mean EMA oscillation frequency so far
(modules that oscillate are pulled toward their bin centres, the others not), and ``strength`` the
official schedule (:func:`regularizer_strength`: 0 for the first quarter of training, then a
half-cosine ramp to ``max_strength``). Optionally, weights whose EMA frequency exceeds
``freeze_threshold`` are frozen at their integer (Nagel et al.'s iterative freezing).

Each epoch's oscillation rate per layer (the fraction of its weights that flipped at least once)
goes to ``oscillation.csv`` and its weight-weighted mean to the history's ``osc_rate``.

Multi-crop distillation from cached soft labels is a QAT option of its own (``--multicrop K``,
:func:`mnq_search.qat.train_qat`), combined with this recipe for the full VVTQ set-up. In the
recipe, with ``lsq``: every weight layer learns its steps (LSQ with its gradient scale,
:mod:`._lsq`) at the module-dependent granularity (per head for fused qkv weights, per output channel
elsewhere), starting from the absmax scales; the learned steps stay in the model and are the integer
path's per-row weight scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UsageError
from ._lsq import module_granularity
from ._oscillation import OscillationTracker
from ._regularizer import regularizer_strength, variation_aware_regularizer

RECIPES = ("plain", "vvtq")


@dataclass(frozen=True)
class VvtqOptions:
    max_strength: float = 0.01
    start_frac: float = 0.25
    momentum: float = 0.01
    freeze_threshold: float | None = None
    lsq: bool = False  # learn the weight steps (LSQ) at the module-dependent granularity

    def validate(self) -> None:
        if not self.max_strength >= 0:
            raise UsageError(f"--vvtq-strength must be non-negative, got {self.max_strength}")


def _weight_cores(qmodel) -> dict[str, torch.nn.Module]:
    from ..mixprec._bops import _core, _weight_layers

    return {name: _core(mod) for name, mod in _weight_layers(qmodel).items() if hasattr(_core(mod), "quant_weight")}


class VvtqRecipe:
    """The recipe's state during one QAT run (see the module docstring)."""

    def __init__(self, qmodel, options: VvtqOptions, total_steps: int, epochs: int):
        options.validate()
        self.options = options
        self.layers = _weight_cores(qmodel)
        if options.lsq:
            self._enable_lsq(qmodel)
        self.tracker = OscillationTracker(options.momentum, options.freeze_threshold)
        self.total, self.epochs = total_steps, max(1, epochs)
        self.epoch_rows: list[dict] = []
        self.last_penalty = 0.0

    def _enable_lsq(self, qmodel) -> None:
        """LSQ steps on every weight layer: per head for fused qkv weights (when the attention module
        says how many heads), per output channel elsewhere (:func:`module_granularity`)."""
        root = getattr(qmodel, "model", qmodel)
        for name, core in self.layers.items():
            g = module_granularity(name + ".weight")
            heads = None
            if g == "head":  # the attention module that holds qkv says how many heads
                heads = getattr(root.get_submodule(name.rpartition(".")[0]), "num_heads", None)
                if not isinstance(heads, int) or core.weight.shape[0] % (3 * heads):
                    g, heads = "channel", None
            core.enable_lsq(g, heads)

    def _steps(self, core) -> torch.Tensor:
        s = core.weight_scale().detach()
        return s.view((-1,) + (1,) * (core.weight.dim() - 1))

    def penalty(self, step: int) -> torch.Tensor | None:
        """The regulariser at ``step`` (None while its strength or every module's variation is 0)."""
        strength = regularizer_strength(step / self.total * self.epochs, self.epochs, self.options.max_strength,
                                        self.options.start_frac)
        if strength == 0.0 or not self.tracker.names:
            return None
        variation = {n: float(self.tracker.ema_frequency(n).mean()) for n in self.layers}
        modules = {n: (c.weight, self._steps(c), c.weight_bits) for n, c in self.layers.items() if variation[n] > 0}
        if not modules:
            return None
        r = variation_aware_regularizer(modules, variation, strength)
        self.last_penalty = float(r.detach())
        return r

    @torch.no_grad()
    def after_step(self) -> None:
        """Record every layer's integers (and pin the frozen weights)."""
        for name, core in self.layers.items():
            w_int, _ = core.quant_weight()
            self.tracker.update(name, w_int)
            if self.options.freeze_threshold is not None:
                self.tracker.freeze_latent_(name, core.weight, self._steps(core))

    def end_epoch(self, epoch: int) -> float:
        """Close the epoch's counts; returns the weight-weighted mean oscillation rate."""
        stats = self.tracker.end_epoch()
        weights = sum(s["weights"] for s in stats.values())
        for name, s in stats.items():
            self.epoch_rows.append({"epoch": epoch, "layer": name, "rate": round(s["rate"], 6),
                                    "mean_frequency": round(s["mean_frequency"], 8), "frozen": s["frozen"]})
        return sum(s["rate"] * s["weights"] for s in stats.values()) / weights if weights else 0.0
