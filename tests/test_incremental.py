"""The incremental evaluator gives, for a sequence of assignments, exactly the logits and the KL of
calibrating and evaluating a fresh copy of the model with each assignment, while running only the
units after the first changed slot."""

from __future__ import annotations

import copy
import random

import pytest
import timm
import torch
import torch.nn.functional as F

from mnq_search.calibrate import calibrate
from mnq_search.convert import convert_model
from mnq_search.incremental import IncrementalEvaluator
from mnq_search.space import SearchSpace


def _tiny(kind):
    torch.manual_seed(0)
    if kind == "vit":
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                                  num_classes=10, embed_dim=32, depth=3, num_heads=2)
        shape = (1, 28, 28)
    else:
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=32, patch_size=2,
                                  in_chans=1, num_classes=10, window_size=4, embed_dim=16, depths=(2, 2),
                                  num_heads=(1, 2))
        shape = (1, 32, 32)
    return model.eval(), shape


def _fresh_logits(qmodel, assignment, calib, val):
    m = copy.deepcopy(qmodel)
    m.set_quant(True)
    m.set_assignment(assignment)
    calibrate(m, [(x, None) for x in calib])
    with torch.inference_mode():
        return [m(x) for x in val]


@pytest.mark.parametrize("kind", ["vit", "swin"])
def test_same_numbers_as_a_fresh_calibration_and_less_work(kind):
    model, shape = _tiny(kind)
    qmodel = convert_model(model, 8, nl_bits=6)
    g = torch.Generator().manual_seed(1)
    calib = [torch.randn(4, *shape, generator=g) for _ in range(3)]
    val = [torch.randn(5, *shape, generator=g) for _ in range(2)]
    ev = IncrementalEvaluator(qmodel, model, calib, val)
    space = SearchSpace.from_model(qmodel)
    rng = random.Random(0)
    assignment = space.random(rng)
    slots = list(assignment)
    sequence = [assignment]
    for k in (len(slots) - 1, len(slots) // 2, 0, len(slots) - 2):  # late, middle, first, late again
        nxt = dict(sequence[-1])
        var = space[slots[k]]
        nxt[slots[k]] = next(c for c in var.choices if c != nxt[slots[k]])
        sequence.append(nxt)
    for a in sequence:
        kl = ev.score(a)
        fresh = _fresh_logits(qmodel, a, calib, val)
        assert all(torch.equal(x, y) for x, y in zip(ev.logits, fresh))
        with torch.inference_mode():
            ref = [F.log_softmax(model(x).double(), -1) for x in val]
        expect = sum(float(F.kl_div(F.log_softmax(q.double(), -1), r, reduction="sum", log_target=True))
                     for q, r in zip(fresh, ref)) / sum(x.shape[0] for x in val)
        assert kl == expect
    assert ev.score(sequence[-1]) == kl and ev.evaluations == len(sequence)  # unchanged: nothing recomputed
    full = len(ev.units) * len(sequence)
    assert ev.units_run < full  # later changes recomputed only part of the model
