"""Scoring assignments that differ from the previous one in a few slots, recomputing only the part
of the model after the first slot that changed: what makes ``sequential`` and ``coordinate``
cheap (issue 17).

A converted ViT / DeiT / Swin is a chain of *units* (the stem, each transformer block, Swin's
patch mergings, the final norm with the head). The evaluator keeps the input of every unit for
each calibration batch *as a full calibration produces it* (the upstream quantizers still moving
with the EMA) and for each validation batch (ranges frozen). When an assignment changes slots in
unit ``i`` and later, only units ``i..`` are reset, re-calibrated on the cached inputs of unit ``i``
and re-evaluated: the same numbers, bit for bit, as calibrating and evaluating a fresh copy of the
model with that assignment (``tests/test_incremental.py``), at the cost of the changed suffix.

The score is the mean KL(float || quantized) of the logits on the validation images, in nats per
image, as the ``proxy`` objective computes it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .calibrate import observing
from .convert import QuantModel
from .errors import UsageError
from .slot import NonLinearSlot, method_params, split_param_key


def _units(model: nn.Module) -> list[tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]]:
    """(modules, function) of each unit of a timm model, in forward order."""
    if isinstance(model, VisionTransformer):
        def stem(x):
            return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

        def head(x):
            return model.forward_head(model.norm(x))

        stem_mods = nn.ModuleList([model.patch_embed, model.norm_pre])
        return ([(stem_mods, stem)] + [(blk, blk) for blk in model.blocks]
                + [(nn.ModuleList([model.norm, model.fc_norm, model.head]), head)])
    if isinstance(model, SwinTransformer):
        out = [(model.patch_embed, model.patch_embed)]
        for stage in model.layers:
            out.append((stage.downsample, stage.downsample))
            out += [(blk, blk) for blk in stage.blocks]

        def head(x):
            return model.forward_head(model.norm(x))

        return out + [(nn.ModuleList([model.norm, model.head]), head)]
    raise UsageError(f"incremental evaluation supports timm VisionTransformer and SwinTransformer, "
                     f"not {type(model).__name__}")


class IncrementalEvaluator:
    """Validation KL of assignments, recomputed from the first changed unit.

    Args:
        qmodel: the converted model (copied; the copy is calibrated and evaluated here).
        float_model: the float model whose logits are the reference.
        calib: the calibration batches (images only), in the order a calibration uses them.
        val: the validation batches (images only).
        device: where to run.
    """

    def __init__(self, qmodel: QuantModel, float_model: nn.Module, calib: list[torch.Tensor],
                 val: list[torch.Tensor], device: str = "cpu"):
        self.model = copy.deepcopy(qmodel)
        self.model.set_quant(True)
        self.units = _units(self.model.model)
        self.slot_ops = self.model.slot_ops()
        self.unit_of = {}
        for i, (mods, _) in enumerate(self.units):
            for m in mods.modules():
                if isinstance(m, NonLinearSlot):
                    self.unit_of[m.name] = i
        missing = set(self.model.slot_ops()) - set(self.unit_of)
        if missing:
            raise UsageError(f"slots outside the model's units: {sorted(missing)[:3]}")
        from .groups import get_groups, group_layers
        from .mixprec._bops import _weight_layers, layer_bits

        unit_by_id = {id(m): i for i, (mods, _) in enumerate(self.units) for m in mods.modules()}
        self.group_unit = {name: unit_by_id[id(mod)] for name, (_, mod) in group_layers(self.model).items()
                           if id(mod) in unit_by_id}
        self.current_groups: dict[str, int | str] = get_groups(self.model)
        self.bits_layers = {name: mod for name, mod in _weight_layers(self.model).items()
                            if id(mod) in unit_by_id and hasattr(mod, "set_bits")}
        self.bits_unit = {name: unit_by_id[id(mod)] for name, mod in self.bits_layers.items()}
        self.current_bits: dict[str, tuple[int, int]] = layer_bits(self.model)
        self.current_slot_bits: dict[str, int] = self.model.slot_bits()
        self.device = device
        self.calib = [x.to(device) for x in calib]
        self.val = [x.to(device) for x in val]
        with torch.inference_mode():
            float_model.eval()
            self.ref = [F.log_softmax(float_model(x).double(), -1) for x in self.val]
        self.n_val = sum(x.shape[0] for x in self.val)
        self.current: dict[str, str] | None = None
        self.cal_in: list[list[torch.Tensor] | None] = [None] * (len(self.units) + 1)
        self.val_in: list[list[torch.Tensor] | None] = [None] * (len(self.units) + 1)
        self.cal_in[0], self.val_in[0] = self.calib, self.val
        self.evaluations = 0
        self.units_run = 0

    def score(self, assignment: Mapping[str, str], groups: Mapping[str, int | str] | None = None,
              bits: Mapping[str, tuple[int, int]] | None = None) -> float:
        """Mean KL(float || quantized) per validation image of ``assignment`` (every slot named);
        ``groups``: group settings of group layers (:mod:`mnq_search.groups`), ``bits``: (weight,
        activation) bits of weight layers (:mod:`mnq_search.mixprec`); layers not named keep theirs.
        The assignment's own ``<layer>@bits`` and ``<layer>@groups`` keys count as ``bits`` and ``groups``;
        ``<slot>@bits`` keys set Softmax and GELU slots' bits (:meth:`QuantModel.set_slot_bits`)."""
        from .slot import layer_bit_pairs, split_layer_keys, split_slot_bits

        assignment, key_bits, key_groups = split_layer_keys(assignment)
        slot_bits, key_bits = split_slot_bits(key_bits, self.slot_ops)
        if key_bits:  # the explicit arguments win over the assignment's own keys
            bits = {**layer_bit_pairs(key_bits), **(bits or {})}
        if key_groups:
            groups = {**key_groups, **(groups or {})}
        try:
            return self._score(assignment, groups, bits, slot_bits)
        except BaseException:  # a failed score (a bad value, an integer overflow in a kernel): the cached
            self.current = None  # activations may not match the model any more, so the next score starts over
            raise

    def _score(self, assignment: dict, groups, bits, slot_bits) -> float:
        changed_slot_bits = [n for n, b in slot_bits.items() if self.current_slot_bits.get(n) != b]
        if changed_slot_bits:
            self.model.set_slot_bits({n: slot_bits[n] for n in changed_slot_bits})
            self.current_slot_bits.update({n: slot_bits[n] for n in changed_slot_bits})
        changed_bits = [n for n, b in (bits or {}).items() if self.current_bits.get(n) != tuple(b)]
        for n in changed_bits:
            if n not in self.bits_layers:
                raise UsageError(f"bits: {n!r} is not a weight layer of this model")
            self.bits_layers[n].set_bits(*bits[n])
            self.current_bits[n] = tuple(bits[n])
        changed_groups = [n for n, g in (groups or {}).items() if self.current_groups.get(n, 1) != g]
        if changed_groups:
            from .groups import set_groups

            set_groups(self.model, {n: groups[n] for n in changed_groups})
            self.current_groups.update({n: groups[n] for n in changed_groups})
        for key in self.current or {}:  # a parameter left out goes back to its default
            parts = split_param_key(key)
            if parts is not None and key not in assignment:
                assignment[key] = method_params(self.slot_ops[parts[0]], parts[1])[parts[2]][0]
        if self.current is None:
            start = 0
        else:
            changed = [s for s, m in assignment.items() if self.current.get(s) != m]
            if not changed and not changed_groups and not changed_bits and not changed_slot_bits:
                return self._kl
            start = min([self.unit_of[(split_param_key(s) or (s,))[0]] for s in changed + changed_slot_bits]
                        + [self.group_unit[n] for n in changed_groups] + [self.bits_unit[n] for n in changed_bits])
        self.model.set_assignment(assignment)
        self.current = assignment
        self._recompute(start)
        self.evaluations += 1
        return self._kl

    @torch.no_grad()
    def _recompute(self, start: int) -> None:
        units = self.units[start:]
        for mods, _ in units:
            self.model.reset_ranges(mods)
        n = len(self.units)
        cal = [None] * (n + 1)
        with observing(self.model):  # the calibration, from the cached inputs of unit ``start``
            cal[start] = self.cal_in[start]
            for i in range(start, n):
                cal[i + 1] = [self.units[i][1](x) for x in cal[i]]
        self.model.eval()
        val = [None] * (n + 1)
        val[start] = self.val_in[start]
        with torch.inference_mode():
            for i in range(start, n):
                val[i + 1] = [self.units[i][1](x) for x in val[i]]
        for i in range(start + 1, n + 1):
            self.cal_in[i], self.val_in[i] = cal[i], val[i]
        self.units_run += n - start
        kl = 0.0
        for logits, ref in zip(val[n], self.ref):
            kl += float(F.kl_div(F.log_softmax(logits.double(), -1), ref, reduction="sum", log_target=True))
        self._kl = kl / self.n_val
        self.logits = val[n]


def evaluator_for(ctx) -> IncrementalEvaluator:
    """An :class:`IncrementalEvaluator` on the run's calibration images and ``val_size``
    validation images (:class:`~mnq_search.context.RunContext`)."""
    calib = [x for x, _ in ctx.calib_batches()]
    val = [x for x, _ in ctx.validation_batches(ctx.settings.val_size)]
    return IncrementalEvaluator(ctx.qmodel, ctx.model, calib, val, ctx.device)


def uniform_kls(ev: IncrementalEvaluator, ctx, **score_kwargs) -> dict[str, float]:
    """The validation KL of each family's uniform assignment on the run's slots, in ``ctx.families``
    order (``score_kwargs``: the weight-layer ``bits`` or ``groups`` every one is scored at, as
    :meth:`IncrementalEvaluator.score` takes them); the best uniform family is its minimum."""
    from .methods import uniform_assignment

    return {f: ev.score(uniform_assignment(f, ctx.slot_ops), **score_kwargs) for f in ctx.families}
