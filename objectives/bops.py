"""Bit operations of an assignment's weight layers (Mix-QViT's cost): ``sum MACs x w_bits x a_bits``
per image, in billions (``gbops``, lower is better), plus the overhead of instance-aware groups.

Bit-widths come from the assignment's ``<layer>@bits`` keys (a joint search over methods and
bit-widths, ``--joint-bits``); layers it does not name keep the model's. MACs are measured once on
the run's model (:func:`mnq_search.mixprec.layer_macs`, one image). With ``proxy`` it makes the
accuracy x BOPs Pareto front of issue 14: ``--objective proxy,bops --sampler nsga2 --joint-bits``.

Group counts come from the assignment's ``<layer>@groups`` keys (``--joint-groups``, IGQ-ViT): each
adds its layer's overhead (:func:`mnq_search.groups.group_overhead`: statistics, assignment and
per-group rescales, at the layer's bit-width in the assignment); 1 group adds nothing. The products
themselves are the weight layers' BOPs, so per tensor the two counts agree.

In a space with Softmax and GELU bit-widths (``<slot>@bits``, ``--joint-nl-bits``) the attention
products count too (:func:`mnq_search.mixprec.attention_bops`): ``A v`` at the probabilities' bits,
which the Softmax slot's bits set; ``q k^T`` at the fixed qkv grid. A GELU's bits change no BOPs.
A uniform budget ``wBaB`` then includes the products with the probabilities at ``B`` bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._base import Objective
from ._registry import register_objective


@register_objective("bops")
class BopsObjective(Objective):
    direction = "minimize"
    metric = "gbops"
    description = "bit operations per image of the weight layers (GBOPs), from the assignment's bit-widths and groups"

    def __init__(self) -> None:
        self.macs: dict[str, int] | None = None
        self.base: dict[str, tuple[int, int]] = {}
        self.shapes: dict | None = None  # group layer -> LayerShape, measured when the space has groups
        self.base_groups: dict[str, int | str] = {}
        self.attention: dict[str, tuple[int, int]] = {}  # softmax slot -> (MACs per product, qkv bits), with nl_bits
        self.base_slot_bits: dict[str, int] = {}

    def setup(self, ctx: Any) -> None:
        from mnq_search.mixprec import layer_bits, layer_macs

        self.macs = layer_macs(ctx.qmodel)
        self.base = layer_bits(ctx.qmodel)
        space = getattr(ctx, "search_space", None)
        if space is not None and (space.variables("groups") or space.variables("nl_bits")):
            x = next(iter(ctx.calib_batches()))[0].to(ctx.device)
            if space.variables("groups"):
                from mnq_search.groups import get_groups, layer_shapes

                self.shapes = layer_shapes(ctx.qmodel, x)
                self.base_groups = get_groups(ctx.qmodel)
            if space.variables("nl_bits"):
                from mnq_search.mixprec import attention_macs

                self.attention = attention_macs(ctx.qmodel, x)
                self.base_slot_bits = ctx.qmodel.slot_bits()

    def evaluate(self, assignment: Mapping[str, Any], ctx: Any = None, trial: Any = None) -> float:
        from mnq_search.mixprec import total_bops
        from mnq_search.slot import layer_bit_pairs, split_layer_keys, split_slot_bits

        if self.macs is None:
            self.setup(ctx)
        _, key_bits, key_groups = split_layer_keys(assignment)
        key_slot_bits, key_bits = split_slot_bits(key_bits, self.base_slot_bits)
        slot_bits = {**self.base_slot_bits, **key_slot_bits}
        bits = {**self.base, **layer_bit_pairs(key_bits)}
        return (total_bops(self.macs, bits) + self.group_overhead({**self.base_groups, **key_groups}, bits, slot_bits)
                + self.attention_bops(slot_bits)) / 1e9

    def attention_bops(self, slot_bits: Mapping[str, int] | int) -> int:
        """BOPs per image of the attention products, counted only in a space with Softmax bit-widths
        (:func:`mnq_search.mixprec.attention_bops`; 0 otherwise)."""
        from mnq_search.mixprec import attention_bops

        return attention_bops(self.attention, slot_bits) if self.attention else 0

    def group_overhead(self, groups: Mapping[str, int | str], bits: Mapping[str, tuple[int, int]] | None = None,
                       slot_bits: Mapping[str, int] | None = None) -> int:
        """BOPs per image of the groups ``groups`` (layer -> setting), each linear's at its ``bits``, the
        probabilities' at their Softmax slot's ``slot_bits``."""
        import dataclasses

        from mnq_search.groups import group_overhead

        if not groups:
            return 0
        if self.shapes is None:
            raise ValueError("the bops objective counts groups only in a search space with group variables")
        total = 0
        for name, g in groups.items():
            shape = self.shapes[name]
            if shape.kind == "linear" and bits and name in bits:
                shape = dataclasses.replace(shape, weight_bits=bits[name][0], act_bits=bits[name][1])
            elif shape.kind != "linear" and slot_bits and name in slot_bits:
                shape = dataclasses.replace(shape, act_bits=slot_bits[name])
            total += group_overhead(shape, g)
        return total

    def budget(self, text: str) -> float:
        """The budget ``text`` (``w6a6``, ``w4a4g8``, ``1.2G``) in GBOPs per image on this model."""
        from mnq_search.mixprec import parse_budget

        def uniform_groups(g: int) -> int:
            return self.group_overhead({name: min(g, s.channels) if s.kind == "linear" else g
                                        for name, s in (self.shapes or {}).items()})

        from mnq_search.budget import parse_budget_spec

        spec = parse_budget_spec(text)
        extra = self.attention_bops(spec.bits[1]) if spec.bits is not None else 0
        return (parse_budget(text, self.macs, uniform_groups if self.shapes is not None else None) + extra) / 1e9
