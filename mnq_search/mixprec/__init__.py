"""Mixed-precision bit allocation for ViTs: the building blocks of Mix-QViT (Ranjan & Savakis, 2025).

- :mod:`._lrp`: layer importance by conservative transformer LRP (Ali et al., ICML 2022);
- :mod:`._hessian`: HAWQ-style importance, the Hutchinson estimate of each layer's Hessian trace;
- :mod:`._bops`: MACs, BOPs and weight bytes of a bit allocation, and budget parsing;
- :mod:`._allocate`: per-layer sensitivity table and the bit allocation as an integer program;
- :mod:`._search`: bit-widths on a converted model, their measured sensitivity and the allocation
  under a budget (what ``--strategy mixqvit`` runs).
"""

from __future__ import annotations

from ._allocate import Allocation, Option, allocate_bits, build_options, sensitivity_table
from ._bops import attention_bops, attention_macs, layer_bits, layer_macs, layer_params, parse_budget, total_bops, weight_bytes
from ._hessian import TraceEstimate, hessian_importance, hessian_trace, weight_layers
from ._lrp import LayerRelevance, LRPTrace, layer_relevance, lrp_trace
from ._search import allocate, bit_sensitivity, bits_summary, set_layer_bits

__all__ = ["allocate", "attention_bops", "attention_macs", "bit_sensitivity", "bits_summary", "set_layer_bits", "Allocation", "LRPTrace", "LayerRelevance", "Option", "TraceEstimate", "allocate_bits", "build_options",
           "hessian_importance", "hessian_trace", "layer_bits", "layer_macs", "layer_params", "layer_relevance",
           "lrp_trace", "parse_budget", "sensitivity_table", "total_bops", "weight_bytes", "weight_layers"]
