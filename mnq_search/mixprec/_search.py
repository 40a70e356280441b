"""Bit-widths per weight layer on a converted model, their sensitivity and their allocation under a
BOP budget (Mix-QViT, issue 14): the glue between the building blocks of this package and a run.

- :func:`set_layer_bits`: (weight bits, activation bits) of named weight layers (checked first);
- :func:`bit_sensitivity`: per layer and candidate, the increase of the validation KL to the float
  logits when that layer alone takes the candidate (every other layer at the model's baseline
  bits), on an :class:`~mnq_search.incremental.IncrementalEvaluator` (recomputed from the layer's
  block on cached activations);
- :func:`allocate`: the integer program of :func:`allocate_bits` over every weight layer (patch
  embedding and head included, so that a uniform budget such as ``w4a4`` stays feasible), scores
  ``importance x sensitivity`` (importance 1, or the LRP share of :func:`layer_relevance`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tqdm.auto import tqdm

from mnq_search.budget import LAYER_BITS, valid_layer_bits
from mnq_search.errors import UsageError

from ._allocate import Allocation, allocate_bits, build_options
from ._bops import Bits, _weight_layers, layer_bits, layer_macs, layer_params, parse_budget

def set_layer_bits(qmodel, bits: Mapping[str, Bits]) -> None:
    """Set (weight bits, activation bits) of the weight layers named in ``bits`` (checked first)."""
    layers = _weight_layers(qmodel)
    for name, pair in bits.items():
        if name not in layers or not hasattr(layers[name], "set_bits"):
            raise UsageError(f"bits: {name!r} is not a quantized weight layer of this model")
        pair = tuple(pair)
        if len(pair) != 2 or not all(valid_layer_bits(b) for b in pair):
            raise UsageError(f"bits of {name}: expected (weight bits, activation bits) in "
                             f"{LAYER_BITS[0]}..{LAYER_BITS[1]}, got {pair!r}")
    for name, (w, a) in bits.items():
        layers[name].set_bits(int(w), int(a))


def bit_sensitivity(evaluator, assignment: Mapping[str, str], candidates: Sequence[Bits],
                    progress: bool = False) -> tuple[dict[str, dict[Bits, float]], float]:
    """(``{layer: {bits: KL increase}}``, the baseline KL): one layer at a time at each candidate,
    every other layer at the evaluator model's bits."""
    base = dict(evaluator.current_bits)
    kl0 = evaluator.score(assignment, bits=base)
    table: dict[str, dict[Bits, float]] = {}
    for name in tqdm(list(evaluator.bits_layers), desc="bit sensitivity", disable=not progress, leave=False):
        row = {}
        for pair in candidates:
            pair = (int(pair[0]), int(pair[1]))
            row[pair] = 0.0 if pair == base[name] else evaluator.score(assignment, bits={**base, name: pair}) - kl0
        table[name] = row
    evaluator.score(assignment, bits=base)
    return table, kl0


def allocate(qmodel, sensitivity: Mapping[str, Mapping[Bits, float]], budget: str | float,
             importance: Mapping[str, float] | None = None) -> tuple[Allocation, float]:
    """(the optimal allocation, the budget in BOPs per image) for ``budget`` (``"w6a6"`` or a BOPs
    count), minimising ``sum importance x sensitivity``."""
    macs = layer_macs(qmodel)
    value = parse_budget(budget, macs) if isinstance(budget, str) else float(budget)
    options = build_options(sensitivity, macs, importance, layer_params(qmodel), default=(8, 8))
    return allocate_bits(options, value), value


def bits_summary(qmodel) -> dict:
    """What a run records of its bit-widths: every layer's pair, the BOPs and weight bytes."""
    from ._bops import total_bops, weight_bytes

    bits = layer_bits(qmodel)
    return {"layers": {n: list(b) for n, b in bits.items()}, "bops_per_image": total_bops(layer_macs(qmodel), bits),
            "weight_bytes": weight_bytes(layer_params(qmodel), bits)}
