"""sequential, coordinate and per_op: deterministic, scored on validation images only, never worse
on validation than where they start, and consistent with a full evaluation of what they return."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from mnq_search.context import RunContext, RunSettings
from mnq_search.convert import convert_model
from mnq_search.incremental import evaluator_for
from mnq_search.methods import NONLINEAR_METHODS, OPS, list_families, uniform_assignment
from mnq_search.plan import split_assignment
from strategies import get_strategy


class _Data:
    """Calibration and validation images only; touching the test split fails the test."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.train = torch.randn(40, 1, 28, 28, generator=g)

    def calib_batches(self, n, batch_size):
        x = self.train[:n]
        return [(x[i:i + batch_size], None) for i in range(0, n, batch_size)]

    def validation_batches(self, n, batch_size):
        x = self.train[-n:]
        return [(x[i:i + batch_size], None) for i in range(0, n, batch_size)]

    def eval_batches(self, *args, **kwargs):
        raise AssertionError("a strategy touched the test split")


@pytest.fixture(scope="module")
def ctx():
    return make_tiny_ctx()


def make_tiny_ctx() -> RunContext:
    """A two-block ViT on 28x28 images, linear layers at 8 bits, non-linear slots at 4."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                              num_classes=10, embed_dim=32, depth=2, num_heads=2).eval()
    qmodel = convert_model(model, 8, nl_bits=4)
    settings = RunSettings(calib_size=8, batch_size=4, val_size=12, progress=False)
    return RunContext(settings=settings, slot_ops=qmodel.slot_ops(), model=model, qmodel=qmodel, data=_Data())


@pytest.mark.parametrize("name", ["sequential", "coordinate", "per_op"])
def test_deterministic_and_never_worse_than_the_start(ctx, name):
    first = get_strategy(name).run(ctx)
    second = get_strategy(name).run(ctx)
    assert first.assignment == second.assignment
    info = first.search
    ev = evaluator_for(ctx)
    kl = ev.score(first.assignment)
    assert kl == pytest.approx(info["kl"], rel=1e-12)  # what it reports is what it returns
    uniforms = [ev.score(uniform_assignment(f, ctx.slot_ops)) for f in list_families()]
    if name == "coordinate":
        assert info["kl_start"] == min(uniforms) and info["kl"] <= info["kl_start"]
    elif name == "sequential":
        assert info["kl"] <= info["kl_best_uniform"] == min(uniforms)
    else:  # the uniform assignments are per-op combinations too
        per_op = [len(NONLINEAR_METHODS[op]) for op in OPS if op in set(ctx.slot_ops.values())]
        assert info["kl"] <= min(uniforms) and len(info["combinations"]) == math.prod(per_op)  # 4 x 3 x 3
    assert set(split_assignment(first.assignment)[0]) == set(ctx.slot_ops)


def test_coordinate_switches_only_when_the_kl_drops(ctx):
    info = get_strategy("coordinate").run(ctx).search
    kls = [info["kl_start"]] + [s["kl"] for s in info["switches"]]
    assert all(b < a for a, b in zip(kls, kls[1:]))
