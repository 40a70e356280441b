"""Instance-aware group quantization on a converted model (IGQ-ViT, Moon et al., CVPR 2024; issue 15).

The *group layers* of a converted model are the inputs of its block linear layers (qkv, proj, fc1,
fc2: post-LayerNorm tokens, attention outputs, FC2 inputs), named by the layer's path, and the
attention probabilities before ``attn v``, named by the softmax slot (``blocks.0.attn.softmax``).
Each takes a group setting: ``1`` (per tensor, today's quantizer), ``G`` instance-aware groups
(:class:`~mnq_search.quant.GroupActQuant` / :class:`~mnq_search.quant.GroupSoftmaxQuant`), or for
the linear inputs ``"channel"`` (static per-channel scales, a reference).

The ``--groups`` setting of a run (:func:`parse_groups`): ``1``, ``channel``, ``G`` (every group
layer at ``G``; ``channel`` keeps the probabilities per tensor), or ``alloc:G``, the paper's group
allocation: the group count of every layer chosen from :data:`CANDIDATES` to minimise the KL
divergence between the quantized and the float predictions on validation images, under the bit
operations (BOPs) of ``G`` groups everywhere. The KL of a layer at each count is measured with
every other layer per tensor (:func:`group_sensitivity`, one layer at a time, recomputed from that
layer's block on cached activations), summed over layers as a separable estimate, and the
allocation is the integer linear program of :func:`mnq_search.mixprec.allocate_bits` (exact, HiGHS).

In a search (``--joint-groups``) each group layer's setting is a variable ``<layer>@groups`` of the
search space (:mod:`mnq_search.space`), set through ``QuantModel.set_assignment`` and costed by the
``bops`` objective with :func:`group_overhead`.

Cost per image (:func:`layer_cost`): the layer's GEMM BOPs at its bit-widths plus the overhead of
its groups from :func:`~mnq_search.quant._group.group_cost` (statistics, assignment, per-group
partial-sum rescales); ``channel`` is counted as folded into the weights (no overhead).

Nothing here imports torch at module level: the CLI parses ``--groups`` before the heavy imports.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import torch

    from .convert import QuantModel

CANDIDATES = (1, 2, 4, 8, 16)
LINEAR_NAMES = ("qkv", "proj", "fc1", "fc2")
CHANNEL = "channel"


@dataclass(frozen=True)
class GroupsSetting:
    """A parsed ``--groups``: ``kind`` is ``"uniform"`` (``groups`` everywhere), ``"channel"`` or
    ``"alloc"`` (allocated under the BOPs of ``groups`` everywhere)."""

    kind: str
    groups: int = 1

    def __str__(self) -> str:
        return {"uniform": str(self.groups), "channel": CHANNEL, "alloc": f"alloc:{self.groups}"}[self.kind]

    @property
    def is_default(self) -> bool:
        return self.kind == "uniform" and self.groups == 1


def parse_groups(text: str | int) -> GroupsSetting:
    """``1``, ``channel``, ``G`` or ``alloc:G`` (``G`` a positive integer) -> :class:`GroupsSetting`."""
    s = str(text).strip()
    kind, sep, g = s.partition(":")
    if s == CHANNEL:
        return GroupsSetting("channel")
    try:
        if sep and kind == "alloc":
            value = int(g)
            if value >= 2:
                return GroupsSetting("alloc", value)
        elif not sep:
            value = int(s)
            if value >= 1:
                return GroupsSetting("uniform", value)
    except ValueError:
        pass
    raise UsageError(f"--groups: expected 1, channel, a group count G >= 1 or alloc:G (G >= 2), got {text!r}")


# --- the group layers of a model ------------------------------------------------------------------

def group_layers(qmodel: QuantModel) -> dict[str, tuple[str, object]]:
    """``{name: (kind, module)}`` in forward order: ``("linear", QLinear)`` for each block linear,
    ``("softmax", attention)`` for each attention's probabilities (named by its softmax slot)."""
    from .attention import _QuantAttentionBase
    from .quant import QLinear

    out: dict[str, tuple[str, object]] = {}
    for path, mod in qmodel.model.named_modules():
        if isinstance(mod, QLinear) and path.rpartition(".")[2] in LINEAR_NAMES:
            out[path] = ("linear", mod)
        elif isinstance(mod, _QuantAttentionBase):
            out[f"{path}.softmax"] = ("softmax", mod)
    # forward order: qkv, softmax, proj inside an attention
    order = {name: i for i, name in enumerate(n for n, m in qmodel.model.named_modules())}

    def rank(name: str) -> tuple[int, int]:
        if name.endswith(".softmax"):
            return order[name[: -len(".softmax")] + ".qkv"], 1
        return order[name], 0 if name.endswith(".qkv") else 2
    return dict(sorted(out.items(), key=lambda kv: rank(kv[0])))


def get_groups(qmodel: QuantModel) -> dict[str, int | str]:
    """The group setting of every group layer."""
    return {name: (mod.groups if kind == "linear" else mod.softmax_groups)
            for name, (kind, mod) in group_layers(qmodel).items()}


def check_group_spec(qmodel: QuantModel, spec: Mapping[str, int | str]) -> dict[str, tuple[str, object]]:
    """One-line UsageError for a name in ``spec`` that is not a group layer or a setting the layer cannot
    take; returns :func:`group_layers`."""
    from .quant._wrappers import check_groups

    layers = group_layers(qmodel)
    for name, value in spec.items():
        if name not in layers:
            raise UsageError(f"groups: {name!r} is not a group layer of this model (e.g. {next(iter(layers), '-')!r})")
        kind, mod = layers[name]
        if kind == "softmax" and value == CHANNEL:
            raise UsageError(f"groups: {name}: the attention probabilities take a group count, not 'channel'")
        check_groups(value, mod.linear.in_features if kind == "linear" else 2**31, f"groups of {name}")
    return layers


def set_groups(qmodel: QuantModel, spec: Mapping[str, int | str]) -> None:
    """Set the group setting of the layers named in ``spec`` (checked first: nothing changes when a
    name or a value is wrong). Changed layers need a new calibration."""
    layers = check_group_spec(qmodel, spec)
    for name, value in spec.items():
        kind, mod = layers[name]
        if kind == "linear":
            mod.set_groups(value)
        else:
            mod.set_softmax_groups(value)


def uniform_groups(qmodel: QuantModel, setting: GroupsSetting | int | str) -> dict[str, int | str]:
    """The spec of a uniform setting: every layer at ``G``; ``channel``: the linear inputs per channel,
    the probabilities per tensor."""
    if not isinstance(setting, GroupsSetting):
        setting = parse_groups(setting)
    if setting.kind == "alloc":
        raise UsageError("alloc:G is not a uniform setting")
    out: dict[str, int | str] = {}
    for name, (kind, _) in group_layers(qmodel).items():
        if setting.kind == "channel":
            out[name] = CHANNEL if kind == "linear" else 1
        else:
            out[name] = setting.groups
    return out


# --- cost -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerShape:
    """Per image: a linear's ``tokens`` x ``channels`` -> ``out_features``; an attention's ``heads``
    rows of ``tokens`` queries over ``keys`` keys (``channels``) into ``out_features`` = head dim."""

    kind: str
    tokens: int
    channels: int
    out_features: int
    heads: int = 1
    act_bits: int = 8
    weight_bits: int = 8


def layer_shapes(qmodel: QuantModel, x: torch.Tensor) -> dict[str, LayerShape]:
    """The shape of every group layer for one image of ``x``'s size (one forward pass of one image)."""
    import torch

    shapes: dict[str, LayerShape] = {}
    hooks = []
    for name, (kind, mod) in group_layers(qmodel).items():
        if kind == "linear":
            def hook(m, args, _out, name=name):
                t = args[0]
                shapes[name] = LayerShape("linear", t[0].numel() // t.shape[-1], t.shape[-1], m.linear.out_features,
                                          act_bits=m.q_in.bits, weight_bits=m.linear.weight_bits)
            hooks.append(mod.register_forward_hook(hook))
        else:
            def hook(m, args, _out, name=name):
                t = args[0]  # (B_, N, C) tokens of a window or an image
                windows = t.shape[0] // x_one.shape[0]
                shapes[name] = LayerShape("softmax", windows * t.shape[1], t.shape[1], m.head_dim, heads=m.num_heads,
                                          act_bits=m.softmax.bits, weight_bits=m.q_qkv.bits)
            hooks.append(mod.register_forward_hook(hook))
    x_one = x[:1]
    try:
        with torch.inference_mode():
            was = qmodel.training
            qmodel.eval()
            quant_on = [q._enabled for q in qmodel.quantizers()]
            qmodel.set_quant(False)
            qmodel(x_one)
            for q, on in zip(qmodel.quantizers(), quant_on):
                q.set_enabled(on)
            qmodel.train(was)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _group_cost(shape: LayerShape, groups: int | str):
    from .quant._group import attention_group_cost, group_cost

    g = 1 if groups == CHANNEL else int(groups)
    if shape.kind == "linear":
        return group_cost(g, shape.channels, shape.out_features, tokens=shape.tokens, act_bits=shape.act_bits,
                          weight_bits=shape.weight_bits)
    # the rows of every window of the image are the instances; keys are the channels
    return attention_group_cost(g, shape.heads, shape.tokens, shape.channels, shape.out_features,
                                act_bits=shape.act_bits, weight_bits=shape.weight_bits)


def layer_cost(shape: LayerShape, groups: int | str) -> int:
    """BOPs per image of one group layer at ``groups``: its product plus the groups' overhead."""
    c = _group_cost(shape, groups)
    return c.gemm_bops + c.bops


def group_overhead(shape: LayerShape, groups: int | str) -> int:
    """BOPs per image of the groups alone (statistics, assignment, per-group rescales; 0 at
    ``1`` and ``channel``): what a joint search adds to the weight layers' BOPs."""
    return _group_cost(shape, groups).bops


def total_cost(shapes: Mapping[str, LayerShape], spec: Mapping[str, int | str]) -> int:
    """BOPs per image of the group layers under ``spec`` (layers not named: per tensor)."""
    return sum(layer_cost(shape, spec.get(name, 1)) for name, shape in shapes.items())


# --- allocation -----------------------------------------------------------------------------------

def candidates_for(shape: LayerShape, candidates=CANDIDATES) -> list[int]:
    return [g for g in candidates if g <= shape.channels]


def group_sensitivity(evaluator, assignment: Mapping[str, str], shapes: Mapping[str, LayerShape],
                      candidates=CANDIDATES, progress: bool = False) -> dict[str, dict[int, float]]:
    """``{layer: {G: KL}}``: the validation KL of ``assignment`` with one layer at ``G`` and every other
    per tensor (an :class:`~mnq_search.incremental.IncrementalEvaluator`)."""
    from tqdm.auto import tqdm

    base = {name: 1 for name in shapes}
    kl0 = evaluator.score(assignment, groups=base)
    out: dict[str, dict[int, float]] = {}
    for name in tqdm(list(shapes), desc="group sensitivity", disable=not progress, leave=False):
        row = {}
        for g in candidates_for(shapes[name], candidates):
            row[g] = kl0 if g == 1 else evaluator.score(assignment, groups={**base, name: g})
        out[name] = row
    evaluator.score(assignment, groups=base)
    return out


@dataclass(frozen=True)
class GroupAllocation:
    groups: dict[str, int]
    cost: int
    budget: int
    estimated_kl: float


def allocate_groups(sensitivity: Mapping[str, Mapping[int, float]], shapes: Mapping[str, LayerShape],
                    budget: int) -> GroupAllocation:
    """The group count of every layer minimising the summed per-layer KL under ``budget`` BOPs per
    image (exact ILP; ties: the cheaper, then the smaller count)."""
    from .mixprec import Option, allocate_bits

    options = {name: [Option((g, g), float(layer_cost(shapes[name], g)), float(kl))
                      for g, kl in sorted(row.items())] for name, row in sensitivity.items()}
    alloc = allocate_bits(options, float(budget))
    groups = {name: bits[0] for name, bits in alloc.choice.items()}
    return GroupAllocation(groups, total_cost(shapes, groups), int(budget), alloc.objective)
