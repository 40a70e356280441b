"""The interface every integer non-linear method implements, and its training-time autograd.

A method is an ``nn.Module`` for one op (``softmax`` over the last dim, ``gelu``, ``layernorm``
over the last dim) from one family (``ibert``, ``fqvit``, ``ivit``). It implements
:meth:`NonLinearMethod.kernel` once, on integer-valued tensors of either kind (see
:mod:`._intops`), and inherits two paths:

- ``forward(x, s_x) -> (y, s_y)``: the training path. ``x`` lies on the grid of ``s_x``; the
  kernel runs on float64-held integers without building a graph; ``y`` (float32) lies on the grid
  of ``s_y``. The backward pass is a straight-through estimator at the level of the op: it is the
  vector-Jacobian product of the exact float op (:meth:`float_op`) at the dequantized input, for
  the input and for the LayerNorm weight and bias. This treats the integer approximation the way
  the STE treats rounding, and keeps only the input tensor alive for backward (the references
  differentiate through every floor of the kernel, which stores a dozen tensors per op).
- ``forward_int(q, s_x) -> (q_y, s_y)``: the integer path, int64 tensors in and out, with the
  register-width checks of :func:`._intops.check_range`.

Both paths call the same kernel with the same integer constants, so they agree bit for bit; the
tests check it on random and adversarial inputs.

Hooks: :meth:`observe` runs in ``train()`` mode before the kernel (calibrated ranges, e.g. FQ-ViT's
power-of-two factors); ranges are buffers, frozen in ``eval()``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..integer import check_bits, to_grid
from ..integer import fast_enabled
from ._fast import FastPlan
from ._intops import FINE_GRID_SCALE, check_range, is_int

PLAN_CACHE_SIZE = 4  # plans kept per module (eval uses one; QAT moves the scale every step)


CPU_BLOCK_ELEMENTS = 1 << 16
"""On the CPU the kernel runs over blocks of rows of about this many elements: its 10-70
elementwise passes then stay in the cache instead of streaming the whole tensor through memory
each time (measured 1.3-1.8x faster per kernel at DeiT-Tiny shapes, batch 100). Kernels treat every
row (last dim) on its own, so blocking gives identical results (tested for every method)."""


def _run_kernel(module: "NonLinearMethod", q: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The method's fast path (:mod:`._fast`) where it has one for this input, else the reference
    kernel on float-held integers; returns (y float32, s_y float64)."""
    if fast_enabled():
        out = module.run_fast(q, s)
        if out is not None:
            return out
    return reference_kernel(module, q, s)


def reference_kernel(module: "NonLinearMethod", q: torch.Tensor, s: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel on float-held integers: float32 where the method proves every intermediate
    stays below 2**24 at this scale (exact there), float64 otherwise; returns (y float32, s_y)."""
    work = torch.float32 if module.float32_exact(s) else torch.float64
    if q.device.type != "cpu" or q.dim() < 2 or q.numel() <= 2 * CPU_BLOCK_ELEMENTS:
        return _scaled(*module.kernel(q.to(work), s), work)
    rows = max(1, CPU_BLOCK_ELEMENTS // q.shape[-1])
    flat = q.reshape(-1, q.shape[-1])
    out = torch.empty(flat.shape, dtype=torch.float32)
    for start in range(0, flat.shape[0], rows):
        y, s_y = _scaled(*module.kernel(flat[start:start + rows].to(work), s), work)
        out[start:start + rows] = y
    return out.view(q.shape), s_y


def _scaled(q_y: torch.Tensor, s_y, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    s_y = torch.as_tensor(s_y, dtype=torch.float64, device=q_y.device)
    return (q_y.double() * s_y).float() if work == torch.float64 or s_y.dim() else q_y.float() * float(s_y), s_y


class _KernelSTE(torch.autograd.Function):
    """Forward: the integer kernel on ``q`` (the input's integers, a float tensor). Backward: the
    float op's vector-Jacobian product at ``q * s_x`` (gradient w.r.t. ``q`` is ``s_x`` times it)."""

    @staticmethod
    def forward(ctx, module: "NonLinearMethod", q: torch.Tensor, s_x: torch.Tensor, *params: torch.Tensor):
        with torch.no_grad():
            y, s_y = _run_kernel(module, q.detach(), float(s_x))
        ctx.module = module
        ctx.save_for_backward(q, s_x, *params)
        s_y = s_y.float()
        ctx.mark_non_differentiable(s_y)
        return y, s_y

    @staticmethod
    def backward(ctx, g_y: torch.Tensor, g_s: torch.Tensor):
        q, s_x, *params = ctx.saved_tensors
        with torch.enable_grad():
            xd = (q.detach().float() * s_x.float()).requires_grad_(q.requires_grad)
            ps = [p.detach().requires_grad_(p.requires_grad) for p in params]
            out = ctx.module.float_op(xd, *ps)
            wrt = [t for t in (xd, *ps) if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wrt, g_y.float()) if wrt else ())
        g_q = (next(grads) * s_x.float()).to(q.dtype) if xd.requires_grad else None
        g_p = [next(grads) if p.requires_grad else None for p in ps]
        return (None, g_q, None, *g_p)


class NonLinearMethod(nn.Module):
    """Base class of the integer Softmax / GELU / LayerNorm methods.

    Args:
        bits: the model's activation bit-width (4..8); what it changes is method-specific and
            documented on each class.
        float_module: for LayerNorm, the ``nn.LayerNorm`` whose weight, bias and eps to copy
            (None: no affine).
        fine_grid: before computing the constants of an exponential or erf, move the integers to
            a grid no coarser than 2**-6 with an exact left shift. The references compute them at
            the input scale, where e.g. I-BERT's floor(-ln2 / S) misplaces every octave by up to
            S / ln2 (8 % at an 8-bit softmax input scale of 0.15); off by default (reference numerics).

    Subclasses set ``op`` and ``family`` (filled in by :func:`register_method`), ``in_bits``
    (the input width the converter gives the slot) and implement :meth:`kernel` and
    :meth:`float_op`; a method with per-slot parameters declares them in :attr:`PARAMS`.
    """

    op: ClassVar[str] = ""
    family: ClassVar[str] = ""
    #: per-slot parameters a method declares as search variables: name -> choices (the first is the
    #: default); the constructor takes them as keyword arguments (IndexSoftmax's ``K`` and ``T``)
    PARAMS: ClassVar[dict[str, tuple]] = {}

    def __init__(self, bits: int = 8, float_module: nn.Module | None = None, fine_grid: bool = False):
        super().__init__()
        self.bits = check_bits(bits)
        self.fine_grid = bool(fine_grid)

    @property
    def exp_s_max(self) -> float | None:
        """Upper end of the internal grid for exp/erf kernels (None: the reference's)."""
        return FINE_GRID_SCALE if self.fine_grid else None

    # --- to implement --------------------------------------------------------------------
    @property
    def in_bits(self) -> int:
        """Bit-width of the input grid this method expects (the slot's input quantizer)."""
        return self.bits

    def kernel(self, q: torch.Tensor, s_x: float) -> tuple[torch.Tensor, float | torch.Tensor]:
        """Integer kernel: integers ``q`` (int64 or float64-held) at scale ``s_x`` -> integers ``q_y``
        of the same kind and their scale ``s_y`` (a float, or a float64 tensor per channel). The
        constants derived from ``s_x`` are Python numbers, computed once per call."""
        raise NotImplementedError

    def float_op(self, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """The exact float op (reference for accuracy tests, and the backward pass)."""
        raise NotImplementedError

    def grad_params(self) -> tuple[torch.Tensor, ...]:
        """Parameters that receive gradients through the op (LayerNorm weight and bias)."""
        return ()

    def observe(self, x: torch.Tensor, s_x: torch.Tensor) -> None:
        """Optional hook, run in ``train()`` mode before the kernel: update calibrated ranges."""

    def reset_calibration(self) -> None:
        """Optional hook: forget what :meth:`observe` learned, as a fresh instance (before a new
        calibration)."""

    def float32_exact(self, s_x: float) -> bool:
        """True when the kernel's intermediates stay below 2**24 at input scale ``s_x`` (for inputs
        of ``in_bits``), so the float-held path may run in float32. Default: False (float64)."""
        return False

    def fast_plan(self, s_x: float, row_len: int, device: torch.device) -> FastPlan | None:
        """Optional: the fast path at input scale ``s_x`` for rows of ``row_len`` (tables and
        constants, see :mod:`._fast`); None: this method has none and the reference kernel runs."""
        return None

    def plan_state(self) -> tuple:
        """What, besides the input scale and row length, the fast plan depends on (calibrated
        buffers, parameters): a key that changes whenever they do (tensor versions)."""
        return ()

    # --- provided ----------------------------------------------------------------------------
    def run_fast(self, q: torch.Tensor, s_x: float, integers: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The fast path on the input integers ``q`` (a float tensor): (y, s_y) with y float32
        dequantized, or float64 integers with ``integers=True``; None where it declines."""
        if q.dim() < 1 or q.numel() == 0:
            return None
        key = (float(s_x), q.shape[-1], q.device, self.plan_state())
        plans = self.__dict__.setdefault("_plans", {})
        if key not in plans:
            if len(plans) >= PLAN_CACHE_SIZE:
                plans.pop(next(iter(plans)))
            plans[key] = self.fast_plan(float(s_x), q.shape[-1], q.device)
        plan = plans[key]
        if plan is None:
            return None
        y = plan.run(q, integers)
        return None if y is None else (y, plan.s_y)

    def forward(self, x: torch.Tensor, s_x: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        s_x = torch.as_tensor(s_x, dtype=torch.float32, device=x.device)
        q = to_grid(x, s_x)  # x lies on the grid: this removes float error only
        return self.forward_q(q, s_x)

    def forward_q(self, q: torch.Tensor, s_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Like forward, from the input's integers ``q`` (a float tensor, as ``ActQuant.quantize``
        gives them); gradients reach ``q``."""
        if self.training:
            with torch.no_grad():
                self.observe(q.detach().float() * s_x, s_x)
        if torch.is_grad_enabled() and (q.requires_grad or any(p.requires_grad for p in self.grad_params())):
            return _KernelSTE.apply(self, q, s_x, *self.grad_params())
        y, s_y = _run_kernel(self, q, float(s_x))
        return y, s_y.float()

    @torch.no_grad()
    def forward_int(self, q: torch.Tensor, s_x: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        if not is_int(q):
            raise TypeError(f"forward_int takes an integer tensor, got {q.dtype}")
        q_y, s_y = self.kernel(q.long(), float(s_x))
        s_y = torch.as_tensor(s_y, dtype=torch.float64, device=q.device)
        if not is_int(q_y):
            raise TypeError(f"{type(self).__name__}.kernel left the integers: output is {q_y.dtype}")
        return check_range(q_y, f"{self.family} {self.op} output"), s_y

    def extra_repr(self) -> str:
        return f"bits={self.bits}, in_bits={self.in_bits}" + (", fine_grid=True" if self.fine_grid else "")


class AffineLayerNorm(NonLinearMethod):
    """Base of the LayerNorm methods: copies weight, bias and eps of the float ``nn.LayerNorm``
    (parameters, trained by QAT through the op-level STE); input on the 16-bit residual grid."""

    def __init__(self, bits: int = 8, float_module: nn.Module | None = None, fine_grid: bool = False):
        super().__init__(bits, float_module, fine_grid)
        w = getattr(float_module, "weight", None)
        b = getattr(float_module, "bias", None)
        self.weight = nn.Parameter(w.detach().clone()) if w is not None else None
        self.bias = nn.Parameter(b.detach().clone()) if b is not None else None
        self.eps = float(getattr(float_module, "eps", 1e-6))

    @property
    def in_bits(self) -> int:
        return 16  # every LayerNorm input is the 16-bit residual stream (I-ViT)

    def grad_params(self):
        return tuple(p for p in (self.weight, self.bias) if p is not None)

    def plan_state(self):
        return tuple((p.data_ptr(), p._version) for p in (self.weight, self.bias) if p is not None)

    def float_op(self, x, *params):
        it = iter(params)  # the tensors of grad_params(), in order
        w = next(it) if self.weight is not None else None
        b = next(it) if self.bias is not None else None
        return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)
