"""HAWQ-style layer importance: the Hutchinson estimate of each weight layer's Hessian trace.

HAWQ-V2 (Dong et al., NeurIPS 2020) ranks layers by the average Hessian trace of the loss with
respect to the layer's weights. The trace is estimated with Hutchinson's method: for Rademacher
vectors ``v`` (entries +-1), ``E[v^T H v] = tr(H)``; each ``H v`` is a Hessian-vector product,
two passes of :func:`torch.autograd.grad` (the gradient built with ``create_graph=True``, then
differentiated along ``v``).

All layers are probed at once with one vector over all their weights, as PyHessian does, so one
HVP per sample serves every layer: layer ``l`` reads ``v_l . (H v)_l = v_l^T H_ll v_l + sum_k
v_l^T H_lk v_k``, whose cross terms have mean 0. The variance of one sample is
``2 (||H_ll||_F^2 - sum_i H_ll[i, i]^2) + sum_{k != l} ||H_lk||_F^2``; the mean of ``m`` samples
has that divided by ``m``. The returned ``stderr`` estimates its square root from the samples.

With several batches, the loss is their size-weighted mean, as for one big batch: each sample
sums the batches' ``v^T H_b v`` with their weights (a fresh vector per batch and sample).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mnq_search.errors import UsageError


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of ``tr(H_ll)`` for one layer's weights.

    Attributes:
        trace: the mean of the samples ``v_l^T (H v)_l``.
        stderr: the samples' standard deviation over ``sqrt(n_samples)`` (0 for one sample).
        n_params: number of weights (the bias is not included).
    """

    trace: float
    stderr: float
    n_params: int

    @property
    def per_param(self) -> float:
        """The average Hessian trace per weight, HAWQ-V2's layer sensitivity."""
        return self.trace / self.n_params


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` and ``nn.Conv2d`` of ``model`` by path, in registration order."""
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, (nn.Linear, nn.Conv2d))}


@contextmanager
def _twice_differentiable(model: nn.Module):
    """Eval mode, and timm attention off its fused kernel (which has no double backward)."""
    was_training = model.training
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    model.eval()
    for m, _ in fused:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, flag in fused:
            m.fused_attn = flag
        model.train(was_training)


def _batch_parts(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise UsageError(f"Hessian batches must be (inputs, targets) pairs, got {type(batch).__name__}")


def hessian_trace(model: nn.Module, batches: Iterable, loss_fn: Callable | None = None, n_samples: int = 32,
                  seed: int = 0, layers: Sequence[str] | None = None) -> dict[str, TraceEstimate]:
    """Hutchinson estimate of the Hessian trace of the loss w.r.t. each layer's weights.

    Args:
        model: any module (a float timm ViT for HAWQ); run in eval mode, restored afterwards.
        batches: ``(inputs, targets)`` pairs; the loss is their size-weighted mean.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (default: cross-entropy, mean).
        n_samples: Rademacher vectors per batch.
        seed: seeds the vectors (a private generator: the global RNG is untouched).
        layers: module paths of the ``nn.Linear`` / ``nn.Conv2d`` layers to probe (default: all).

    Returns:
        Layer path -> :class:`TraceEstimate`, in the order of ``layers``.
    """
    if n_samples < 1:
        raise UsageError(f"n_samples must be >= 1, got {n_samples}")
    found = weight_layers(model)
    names = list(found) if layers is None else list(layers)
    unknown = [n for n in names if n not in found]
    if unknown:
        raise UsageError(f"not a Linear/Conv2d layer of the model: {', '.join(unknown)}")
    if not names:
        raise UsageError("the model has no Linear/Conv2d layer to probe")
    loss_fn = loss_fn or F.cross_entropy
    params = [found[n].weight for n in names]
    gen = torch.Generator().manual_seed(seed)
    samples = torch.zeros(n_samples, len(names), dtype=torch.float64)
    batch_list = [_batch_parts(b) for b in batches]
    total = sum(int(x.shape[0]) for x, _ in batch_list)
    if total == 0:
        raise UsageError("no batches to estimate the Hessian trace on")
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with _twice_differentiable(model), torch.enable_grad():
            for x, y in batch_list:
                weight = x.shape[0] / total
                loss = loss_fn(model(x), y)
                grads = torch.autograd.grad(loss, params, create_graph=True)
                for s in range(n_samples):
                    vs = [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(p)
                          for p in params]
                    hvs = torch.autograd.grad(grads, params, grad_outputs=vs, retain_graph=True)
                    for i, (v, hv) in enumerate(zip(vs, hvs)):
                        samples[s, i] += weight * float((v.double() * hv.double()).sum())
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    mean = samples.mean(dim=0)
    std = samples.std(dim=0) if n_samples > 1 else torch.zeros(len(names), dtype=torch.float64)
    return {name: TraceEstimate(float(mean[i]), float(std[i]) / math.sqrt(n_samples), params[i].numel())
            for i, name in enumerate(names)}


def hessian_importance(model: nn.Module, batches: Iterable, loss_fn: Callable | None = None, n_samples: int = 32,
                       seed: int = 0, layers: Sequence[str] | None = None) -> dict[str, float]:
    """HAWQ-V2 layer importance: the estimated Hessian trace per weight of every layer.

    Args:
        model: any module (a float timm ViT for HAWQ).
        batches: ``(inputs, targets)`` pairs.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (default: cross-entropy).
        n_samples: Rademacher vectors per batch.
        seed: seeds the vectors.
        layers: module paths to probe (default: every ``nn.Linear`` / ``nn.Conv2d``).

    Returns:
        Layer path -> average Hessian trace per weight (see :func:`hessian_trace`).
    """
    return {name: est.per_param
            for name, est in hessian_trace(model, batches, loss_fn, n_samples, seed, layers).items()}
