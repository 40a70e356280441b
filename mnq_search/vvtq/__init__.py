"""Building blocks of variation-aware ViT QAT (VVTQ: Huang, Shen, Dong, Cheng, "Quantization Variation:
A New Perspective on Training Transformers with Low-Bit Precision", 2023).

- :mod:`._lsq`: LSQ quantizers (learnable step, gradient scale) per tensor, channel or head, and the
  module-dependent default granularity;
- :mod:`._oscillation`: per-weight oscillation counting of integer weights, rates per layer and
  epoch, optional freezing;
- :mod:`._regularizer`: the variation-aware bin regulariser and a per-module variation measure;
- :mod:`._multicrop`: multi-crop knowledge distillation with cached top-k teacher soft labels.
"""

from __future__ import annotations

from ._lsq import GRANULARITIES as GRANULARITIES
from ._lsq import LsqQuantizer as LsqQuantizer
from ._lsq import lsq_qrange as lsq_qrange
from ._lsq import module_granularity as module_granularity
from ._multicrop import CROP_FIELDS as CROP_FIELDS
from ._multicrop import CropBatch as CropBatch
from ._multicrop import SoftLabelCache as SoftLabelCache
from ._multicrop import SoftTargets as SoftTargets
from ._multicrop import build_soft_label_cache as build_soft_label_cache
from ._multicrop import epoch_batches as epoch_batches
from ._multicrop import epoch_plan as epoch_plan
from ._multicrop import kd_loss as kd_loss
from ._multicrop import render_crops as render_crops
from ._multicrop import sample_crop_params as sample_crop_params
from ._oscillation import OscillationTracker as OscillationTracker
from ._regularizer import WeightChangeStats as WeightChangeStats
from ._regularizer import bin_distance as bin_distance
from ._regularizer import bin_regularizer as bin_regularizer
from ._regularizer import regularizer_strength as regularizer_strength
from ._regularizer import variation_aware_regularizer as variation_aware_regularizer

__all__ = ["CROP_FIELDS", "CropBatch", "GRANULARITIES", "LsqQuantizer", "OscillationTracker", "SoftLabelCache",
           "SoftTargets", "WeightChangeStats", "bin_distance", "bin_regularizer", "build_soft_label_cache",
           "epoch_batches", "epoch_plan", "kd_loss", "lsq_qrange", "module_granularity", "regularizer_strength",
           "render_crops", "sample_crop_params", "variation_aware_regularizer"]
