"""What the official I-ViT ShiftGELU and FQ-ViT integer LayerNorm compute, restated for comparison.

Written for this project from the published descriptions and from reading the official modules
(I-ViT ``IntGELU``, FQ-ViT ``QIntLayerNorm`` with its PTF input observer and unsigned min/max output
quantizer); no code is copied. Both are evaluated in float64 the way the official modules evaluate
their float-held integers, so they are the yardstick for the fidelity checks of
``tests/methods_tests/test_fidelity.py`` and ``benchmarks/fidelity_official.py``: how close the
project's integer methods come to the official modules on the same inputs.

Also the inputs of those checks: ViT-like activations with long-tailed channels at several scales.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # the input scales of a fidelity cell (multiplying the tensor)


def long_tailed_fc1(seed: int = 0, tokens: int = 197, channels: int = 768, batch: int = 2) -> torch.Tensor:
    """FC1 outputs (GELU inputs): per-channel spread log-normal (a few channels 5-20x wider), mostly
    negative means, Laplace tails."""
    g = torch.Generator().manual_seed(seed)
    spread = torch.exp(0.8 * torch.randn(channels, generator=g))
    shift = -0.5 + 0.3 * torch.randn(channels, generator=g)
    core = torch.randn(batch, tokens, channels, generator=g)
    u = torch.rand(batch, tokens, channels, generator=g).clamp(1e-6, 1 - 1e-6)
    lap = -torch.sign(u - 0.5) * torch.log1p(-2 * (u - 0.5).abs())  # Laplace(0, 1)
    tail = torch.rand(batch, tokens, channels, generator=g) < 0.05
    return (torch.where(tail, 3 * lap, core) * spread + shift).float()


def long_tailed_tokens(seed: int = 0, tokens: int = 197, channels: int = 192, batch: int = 2) -> torch.Tensor:
    """Residual-stream tokens (LayerNorm inputs) with six outlier channels 20-50x larger."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=g) + 0.3 * torch.randn(channels, generator=g)
    idx = torch.randperm(channels, generator=g)[:6]
    factor = 20.0 + 30.0 * torch.rand(6, generator=g)
    x[..., idx] = x[..., idx] * factor + factor
    return x


def symmetric_grid(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    """(integers, scale) of x on a symmetric absmax ``bits``-bit grid, half-up rounding."""
    s = float(x.abs().max()) / (2 ** (bits - 1) - 1)
    q = torch.clamp(torch.floor(x.double() / s + 0.5), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return q, s


# --- I-ViT ShiftGELU -------------------------------------------------------------------------------

def _official_shift_exp(q: torch.Tensor, s: float, n: int) -> torch.Tensor:
    """I-ViT's shift-exp on float-held integers: log2(e) by shifts, r / 2 not floored, one floor
    after the power of two (float64 throughout)."""
    q = q + torch.floor(q / 2) - torch.floor(q / 16)
    x0 = math.floor(-1.0 / s)
    q = torch.maximum(q, torch.full_like(q, n * x0))
    z = torch.floor(q / x0)
    r = q - x0 * z
    return torch.clamp(torch.floor((r / 2 - x0) * torch.exp2(n - z)), min=0)


def official_shift_gelu(q: torch.Tensor, s: float, out_bits: int = 8) -> torch.Tensor:
    """I-ViT ShiftGELU's dequantized output for input integers ``q`` at scale ``s``: the sigmoid's
    1.702 goes into the scale, the row maximum is that of q, n = 23."""
    q = q.double()
    s_sig = s * 1.702
    m = q.amax(dim=-1, keepdim=True)
    a = _official_shift_exp(q - m, s_sig, 23)
    b = _official_shift_exp(-m, s_sig, 23)
    total = torch.clamp(a + b, max=2**31 - 1)
    f = torch.floor((2**31 - 1) / total)
    sig = torch.floor(a * f / 2 ** (32 - out_bits))
    return q * sig * (s / 2 ** (out_bits - 1))


# --- FQ-ViT integer LayerNorm ----------------------------------------------------------------------

def _unsigned_grid(lo: float, hi: float, bits: int) -> tuple[float, float]:
    levels = 2**bits - 1
    scale = max((hi - lo) / levels, 1e-8)
    zp = min(max(float(torch.round(torch.tensor(-lo / scale))), 0.0), float(levels))  # round half to even
    return scale, zp


def official_fqvit_layernorm(x: torch.Tensor, ln: torch.nn.LayerNorm, bits: int) -> torch.Tensor:
    """FQ-ViT's integer LayerNorm on ``x`` (its own calibration batch), with its neighbours: the PTF
    input quantizer (unsigned ``bits``, min/max range, per-channel power-of-two factor by L2 error)
    and the unsigned min/max ``bits``-bit quantizer of the next layer applied to the output."""
    xd = x.double()
    channels = x.shape[-1]
    levels = 2**bits - 1
    s8, zp = _unsigned_grid(float(xd.min()), float(xd.max()), bits)
    errs, codes = [], []
    for alpha in range(4):
        sc = s8 / 2 ** (3 - alpha)
        u = torch.clamp(torch.round(xd / sc + zp), 0, levels)
        codes.append((u - zp) * 2**alpha)  # integers at base s1 = s8 / 8
        errs.append(((xd - (u - zp) * sc) ** 2).reshape(-1, channels).sum(0))
    best = torch.stack(errs).argmin(0)
    x_q = torch.gather(torch.stack(codes, -1), -1, best.view(1, 1, -1, 1).expand(*xd.shape, 1)).squeeze(-1)
    s1 = s8 / 8
    w, b = ln.weight.detach().double(), ln.bias.detach().double()
    float_out = F.layer_norm(xd, (channels,), w, b, ln.eps)
    s_out, zp_out = _unsigned_grid(float(float_out.min()), float(float_out.max()), bits)
    mean = x_q.mean(-1) * s1
    std = (s1 / channels) * torch.sqrt(channels * (x_q**2).sum(-1) - x_q.sum(-1) ** 2)
    a = (s1 / std).unsqueeze(-1) * w / s_out
    n = torch.clamp(7 - torch.floor(torch.log2(a.abs())), 0, 31)
    m = torch.clamp(torch.floor(a.abs() * torch.exp2(n)), 0, 255)
    bias = torch.round((b - (mean / std).unsqueeze(-1) * w) / s_out * torch.exp2(n))
    y = torch.round((a.sign() * m * x_q + bias) / torch.exp2(n)) * s_out
    y_q = torch.clamp(torch.round(y / s_out + zp_out), 0, levels)
    return (y_q - zp_out) * s_out


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.double(), approx.double()
    return float(10 * torch.log10((ref**2).sum() / ((ref - approx) ** 2).sum().clamp(min=1e-300)))


# --- the project's methods on the same inputs --------------------------------------------------------

def fidelity_cell(op: str, method: str, bits: int, seed: int = 0) -> list[tuple[float, float, float]]:
    """Per input scale of :data:`SCALES`: (scale, SQNR of the project's method, SQNR of the official
    module) in dB against the exact float op on the same quantized input."""
    from mnq_search.methods import make_nonlinear
    from mnq_search.testing import affine_layernorm

    out = []
    for factor in SCALES:
        if op == "gelu":
            q, s = symmetric_grid(long_tailed_fc1(seed) * factor, bits)
            mod = make_nonlinear("gelu", method, bits).eval()
            with torch.no_grad():
                ours = mod.forward_q(q.float(), torch.tensor(s, dtype=torch.float32))[0]
            ref = F.gelu(q * s)
            official = official_shift_gelu(q, s)
        else:
            q, s = symmetric_grid(long_tailed_tokens(seed) * factor, 16)
            ln = affine_layernorm(q.shape[-1], seed)
            mod = make_nonlinear("layernorm", method, bits, ln)
            x = (q * s).float()
            s_t = torch.tensor(s, dtype=torch.float32)
            mod.train()
            with torch.no_grad():
                mod(x, s_t)
            mod.eval()
            with torch.no_grad():
                ours = mod(x, s_t)[0]
            ref = F.layer_norm(x.double(), (x.shape[-1],), ln.weight.detach().double(), ln.bias.detach().double(), ln.eps)
            official = official_fqvit_layernorm(x, ln, bits)
        out.append((factor, sqnr_db(ref, ours), sqnr_db(ref, official)))
    return out
