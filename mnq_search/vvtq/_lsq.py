"""LSQ quantizers with a learnable step (Esser et al., "Learned Step Size Quantization", ICLR 2020)
at the module-dependent granularities of VVTQ (Huang, Shen, Dong, Cheng, "Quantization Variation:
A New Perspective on Training Transformers with Low-Bit Precision", 2023).

Forward, for a step ``s > 0`` and ``v = x / s``::

    q = clamp(floor(v + 1/2), qmin, qmax)        # the project's half-up rounding
    x_hat = q * s                                # fake-quantized output

Backward (LSQ, Eq. 3 and 5 of Esser et al.), with ``g = 1 / sqrt(N * Q_p)``, ``Q_p = qmax`` and
``N`` the number of elements that share one step::

    d x_hat / d x = 1 if qmin <= v <= qmax else 0                 # straight-through estimator
    d x_hat / d s = q - v if qmin <= v <= qmax, qmin if v < qmin, qmax if v > qmax
    grad(s)       = g * sum over the step's elements of grad(x_hat) * d x_hat / d s

These are the exact derivatives of the *surrogate* ``s * (clamp(x / s, qmin, qmax) + r)`` in which
the rounding residual ``r = q - clamp(v)`` is held constant; they are not the derivatives of the
rounded function itself (with the integer ``q`` held fixed, ``d x_hat / d s`` would be ``q``).

Granularities ("module-dependent quantization", the project's reading of the paper's "module-
dependent quantization scheme"; see :func:`module_granularity`):

- ``"tensor"``: one step for the whole tensor (activations);
- ``"channel"``: one step per output channel, i.e. per index of dim 0 of a weight;
- ``"head"``: one step per attention head of a fused ``qkv`` weight of shape ``(3 * D, D_in)``: its
  rows split into ``3 * num_heads`` contiguous groups of ``D / num_heads`` rows (timm's layout
  ``(3, heads, head_dim)``), or ``num_heads`` groups for a separate q, k or v projection.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UsageError
from ..quant import qrange

GRANULARITIES = ("tensor", "channel", "head")
STEP_EPS = 1e-8  # the step is floored here in the forward so that x / s stays finite
BITS_LIMITS = (2, 16)


def lsq_qrange(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax): ``qrange(bits)`` when signed, ``(0, 2**bits - 1)`` when not."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not BITS_LIMITS[0] <= bits <= BITS_LIMITS[1]:
        raise UsageError(f"LSQ bits must be an integer in {BITS_LIMITS[0]}..{BITS_LIMITS[1]}, got {bits!r}")
    return tuple(qrange(bits)) if signed else (0, 2**bits - 1)


def module_granularity(name: str) -> str:
    """The module-dependent default granularity for the quantizer of a tensor named ``name``.

    The project's reading of the paper's "module-dependent quantization scheme": the fused ``qkv``
    weight of an attention block gets one step per head (its heads vary very differently), the other
    weights (``*.weight``: linear layers, the patch-embedding convolution) one step per output
    channel, and everything else (activations, e.g. ``blocks.0.attn.qkv.input``) one step per tensor.

    Args:
        name: a dotted parameter or quantizer name, e.g. ``"blocks.3.attn.qkv.weight"``.

    Returns:
        ``"head"``, ``"channel"`` or ``"tensor"``.
    """
    if not isinstance(name, str) or not name.strip():
        raise UsageError(f"module_granularity needs a non-empty name, got {name!r}")
    parts = name.strip().split(".")
    if parts[-1] == "weight":
        return "head" if len(parts) >= 2 and parts[-2] == "qkv" else "channel"
    return "tensor"


class _GradScale(torch.autograd.Function):
    """Identity forward (bit-exact), gradient multiplied by ``g`` (LSQ's step-gradient scale)."""

    @staticmethod
    def forward(ctx, s, g):
        ctx.g = g
        return s.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.g, None


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``t`` over the dimensions that were broadcast from ``shape``."""
    lead = t.dim() - len(shape)
    if lead:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


class _LsqFn(torch.autograd.Function):
    """``clamp(floor(x / s + 1/2)) * s`` with the LSQ gradients for x and s (s broadcastable to x)."""

    @staticmethod
    def forward(ctx, x, s, qmin, qmax):
        v = x / s
        q = torch.clamp(torch.floor(v + 0.5), qmin, qmax)
        ctx.save_for_backward(v, q)
        ctx.qmin, ctx.qmax, ctx.s_shape = qmin, qmax, s.shape
        return q * s

    @staticmethod
    def backward(ctx, grad):
        v, q = ctx.saved_tensors
        below, above = v < ctx.qmin, v > ctx.qmax
        inside = ~(below | above)
        grad_x = grad * inside
        ds = torch.where(below, torch.full_like(v, ctx.qmin), torch.where(above, torch.full_like(v, ctx.qmax), q - v))
        grad_s = _sum_to(grad * ds, ctx.s_shape)
        return grad_x, grad_s, None, None


class LsqQuantizer(nn.Module):
    """A fake quantizer with a learnable step ``s`` (LSQ) at one granularity.

    The step is a parameter of shape ``()`` ("tensor"), ``(channels,)`` ("channel") or
    ``(groups,)`` ("head", ``groups = 3 * num_heads`` for a fused qkv weight). It is initialised on
    the first tensor seen (or by :meth:`initialize` / :meth:`set_step`) as in LSQ:
    ``s = 2 * mean(|x|) / sqrt(Q_p)`` over the elements that share it.

    Args:
        bits: bit width, 2..16.
        granularity: ``"tensor"``, ``"channel"`` or ``"head"``.
        signed: ``[-2**(b-1), 2**(b-1) - 1]`` when True, ``[0, 2**b - 1]`` when False.
        channels: number of output channels (dim 0), required for ``"channel"``.
        num_heads: number of attention heads, required for ``"head"``.
        fused_qkv: for ``"head"``: the tensor is a fused qkv weight (``3 * num_heads`` groups);
            False for a separate q, k or v projection (``num_heads`` groups).
        grad_scale: apply LSQ's gradient scale ``g = 1 / sqrt(N * Q_p)`` to the step gradient.
        grad_numel: ``N`` of that scale; default: the number of elements of the quantized tensor
            that share one step (LSQ's N_W for weights; for activations this counts the batch too,
            pass the number of features per example for LSQ's N_F).
    """

    def __init__(self, bits: int, granularity: str = "tensor", signed: bool = True, *,
                 channels: int | None = None, num_heads: int | None = None, fused_qkv: bool = True,
                 grad_scale: bool = True, grad_numel: int | None = None):
        super().__init__()
        if granularity not in GRANULARITIES:
            raise UsageError(f"unknown LSQ granularity {granularity!r}; choose from: {', '.join(GRANULARITIES)}")
        self.bits, self.granularity, self.signed = bits, granularity, bool(signed)
        self.qmin, self.qmax = lsq_qrange(bits, self.signed)
        if granularity == "channel":
            if not isinstance(channels, int) or channels <= 0:
                raise UsageError(f"per-channel LSQ needs a positive number of channels, got {channels!r}")
            n_steps = channels
        elif granularity == "head":
            if not isinstance(num_heads, int) or num_heads <= 0:
                raise UsageError(f"per-head LSQ needs a positive num_heads, got {num_heads!r}")
            n_steps = (3 if fused_qkv else 1) * num_heads
        else:
            n_steps = None
        if grad_numel is not None and grad_numel <= 0:
            raise UsageError(f"grad_numel must be positive, got {grad_numel}")
        self.num_heads, self.fused_qkv = num_heads, fused_qkv
        self.use_grad_scale, self.grad_numel = grad_scale, grad_numel
        self.step = nn.Parameter(torch.ones(() if n_steps is None else (n_steps,)))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self._initialized = False  # mirrors the buffer so that forward never syncs with a device

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    # --- layout -------------------------------------------------------------------------------

    @property
    def num_steps(self) -> int:
        return self.step.numel()

    def _check(self, x: torch.Tensor) -> None:
        if self.granularity == "tensor":
            return
        if x.dim() < 1 or x.shape[0] % self.num_steps or (self.granularity == "channel" and x.shape[0] != self.num_steps):
            what = "channels" if self.granularity == "channel" else "head groups"
            raise UsageError(f"LSQ {self.granularity} quantizer with {self.num_steps} {what} cannot take a tensor "
                             f"of shape {tuple(x.shape)} (dim 0 must be {'' if what == 'channels' else 'a multiple of '}"
                             f"{self.num_steps})")

    def _rows_per_step(self, x: torch.Tensor) -> int:
        return x.shape[0] // self.num_steps

    def expand_step(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The per-step tensor ``s`` broadcast to ``x`` (``()`` or ``(rows, 1, ..., 1)``)."""
        if self.granularity == "tensor":
            return s
        if self.granularity == "head":
            s = s.repeat_interleave(self._rows_per_step(x))
        return s.view(-1, *([1] * (x.dim() - 1)))

    def numel_per_step(self, x: torch.Tensor) -> int:
        """LSQ's N: the elements of ``x`` that share one step (or ``grad_numel`` when given)."""
        if self.grad_numel is not None:
            return self.grad_numel
        return x.numel() // self.num_steps

    def grad_scale_factor(self, x: torch.Tensor) -> float:
        """``g = 1 / sqrt(N * Q_p)`` for the tensor ``x`` (1.0 when the scale is off)."""
        return 1.0 / math.sqrt(self.numel_per_step(x) * self.qmax) if self.use_grad_scale else 1.0

    def _group_mean_abs(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().abs().float()
        if self.granularity == "tensor":
            return a.mean()
        return a.reshape(self.num_steps, -1).mean(dim=1)

    # --- initialisation -----------------------------------------------------------------------

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """LSQ's initialisation from a tensor: ``s = 2 * mean(|x|) / sqrt(Q_p)`` per step."""
        self._check(x)
        s = 2.0 * self._group_mean_abs(x) / math.sqrt(self.qmax)
        self.step.copy_(torch.clamp(s, min=STEP_EPS).to(self.step))
        self.initialized.fill_(True)
        self._initialized = True

    @torch.no_grad()
    def set_step(self, step: torch.Tensor | float) -> None:
        """Set the step from a value (broadcast to the step's shape); it must be positive."""
        step = torch.as_tensor(step, dtype=self.step.dtype, device=self.step.device)
        if not bool(torch.isfinite(step).all()) or bool((step <= 0).any()):
            raise UsageError("LSQ step sizes must be positive and finite")
        try:
            self.step.copy_(step.expand_as(self.step))
        except RuntimeError:
            raise UsageError(f"step of shape {tuple(step.shape)} does not fit {tuple(self.step.shape)}") from None
        self.initialized.fill_(True)
        self._initialized = True

    # --- quantization -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fake-quantized tensor ``q * s`` with LSQ's gradients for ``x`` and the step."""
        return self.fake_quant_parts(x)[0]

    def fake_quant_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(:meth:`forward`'s ``q * s``, the step broadcast to ``x`` with the gradient scale on it)."""
        self._check(x)
        if not self._initialized:
            self.initialize(x)
        s = torch.clamp(self.step, min=STEP_EPS)
        if torch.is_grad_enabled() and s.requires_grad:
            s = _GradScale.apply(s, self.grad_scale_factor(x))
        s = self.expand_step(s, x).to(x.dtype)
        return _LsqFn.apply(x, s, self.qmin, self.qmax), s

    def row_steps(self, x: torch.Tensor) -> torch.Tensor:
        """The step of every row of ``x`` (dim 0), shape ``(rows,)``."""
        self._check(x)
        return self.expand_step(torch.clamp(self.step, min=STEP_EPS), x).reshape(-1).expand(x.shape[0])

    @torch.no_grad()
    def integers(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For an integer path: (the integers ``q`` of ``x`` as int32, the step broadcastable to ``x``).

        ``q * step`` equals :meth:`forward` (``x`` is not used to initialise: call forward or
        :meth:`initialize` first).
        """
        self._check(x)
        if not self._initialized:
            raise UsageError("the LSQ quantizer has no step yet: run it on a batch or call initialize()")
        s = self.expand_step(torch.clamp(self.step.detach(), min=STEP_EPS), x).to(x.dtype)
        q = torch.clamp(torch.floor(x / s + 0.5), self.qmin, self.qmax)
        return q.to(torch.int32), s

    def extra_repr(self) -> str:
        extra = f", num_heads={self.num_heads}" if self.granularity == "head" else ""
        return f"bits={self.bits}, granularity={self.granularity}, signed={self.signed}, steps={self.num_steps}{extra}"
