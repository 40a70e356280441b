"""Calibration (post-training quantization ranges) and evaluation of a converted model."""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from .convert import QuantModel
from .methods import NonLinearMethod
from .quant import FINE_QUANTIZERS, ActQuant


@contextmanager
def observing(model: torch.nn.Module):
    """Eval semantics (no dropout / drop-path) with every range observer following the batches."""
    was_training = model.training
    model.eval()
    for m in model.modules():
        if isinstance(m, (ActQuant, NonLinearMethod, *FINE_QUANTIZERS)):
            m.train()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def calibrate(qmodel: QuantModel, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device="cpu",
              progress: bool = False) -> int:
    """Reset and fit every activation range (EMA min/max) on ``batches``; returns the image count."""
    qmodel.reset_ranges()
    n = 0
    with observing(qmodel):
        for x, _ in tqdm(batches, desc="calibrate", disable=not progress, leave=False):
            qmodel(x.to(device))
            n += x.shape[0]
    qmodel.eval()
    return n


@torch.inference_mode()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device="cpu",
             progress: bool = False, desc: str = "evaluate", keep_correct: bool = False) -> dict[str, float]:
    """Top-1 / top-5 accuracy (percent), image count and seconds, like timm's validate.py;
    ``keep_correct``: also ``correct``, the per-image top-1 correctness (bool, CPU), for paired
    statistics."""
    model.eval()
    correct1 = correct5 = n = 0
    per_image = []
    t0 = time.perf_counter()
    for x, y in tqdm(batches, desc=desc, disable=not progress, leave=False):
        logits = model(x.to(device)).float()
        y = y.to(device)
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        if keep_correct:
            per_image.append((top[:, 0] == y).cpu())
        correct1 += int((top[:, 0] == y).sum())
        correct5 += int((top == y[:, None]).any(dim=-1).sum())
        n += y.numel()
    if n == 0:
        from .errors import UsageError

        raise UsageError("evaluation data is empty")
    out = {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "images": n,
           "seconds": time.perf_counter() - t0}
    if keep_correct:
        out["correct"] = torch.cat(per_image)
    return out
