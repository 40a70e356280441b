"""IndexSoftmax: a table softmax indexed by the clipped distance to the row maximum (IntAttention).

Zhong et al., "IntAttention: ...", MLSys 2026 (the issue's summary is the source of the facts).
The family has a softmax only; ``uniform:index`` takes I-BERT's GELU and LayerNorm.

Per row, in integers (input ``q`` on the slot's ``bits``-bit grid of scale ``S``):

- ``d = rowmax - q`` and the threshold ``T_int = max(1, round(T / S))`` (``T`` in logits);
- ``i = floor(min(d, T_int) (K - 1) / T_int)``: every ``d >= T_int`` lands on the last entry;
- ``e = table[i]``, ``table[k] = round(255 exp(-k T / (K - 1)))`` for ``k < K - 1`` and
  ``table[K - 1] = 0``, so everything clipped is an exact zero (Swin's masked logits too);
- ``sum = sum(e)`` (at least 255: the maximum's entry; kept below 2**23, see below),
  ``f = ceil(2**40 / sum)`` (one reciprocal per row), ``p = (e L f + 2**39) >> 40`` with
  ``L = 2**bits - 1`` (255 at 8 bits), at scale ``1 / L``.

The reciprocal is exact enough that ``p`` is ``round_half_up(L e / sum)`` for every row: the
product overestimates ``L e / sum`` by less than ``L e / 2**40 <= 2**-24``, and a value of the
form ``L e / sum`` lies at least ``1 / (2 sum) > 2**-24`` below the next rounding boundary when
``sum < 2**23`` (rows of up to 32,896 tokens); the integer path checks that bound.

Per-slot parameters (search variables): ``K`` (16, 32 or 64 entries; 32 by default) and ``T``
(6.6 by default, a grid 4, 5, 8, 10, or ``"calib"``: the value of :data:`T_CALIB_GRID` (3 to 12 in
steps of 0.25, and the fixed choices) with the lowest mean squared error of the probabilities against the float softmax on the calibration rows,
chosen in :meth:`IndexSoftmax.observe`).

Fast path: the table of ``d -> e`` over every difference a slot can produce (as for every table
softmax, :class:`._tables.TableSoftmax`) and one compiled loop per row for the rest.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..distributed import all_reduce_
from ..integer._compiled import jit
from ._fast import _exp_rows
from ._intops import as_kind, check_range, floor_div, shr
from ._registry import Family, register_family, register_method
from ._tables import TableSoftmax

AMPLITUDE = 255  # the table's value at d = 0 (8-bit exponentials)
RECIPROCAL_SHIFT = 40
DEFAULT_K, DEFAULT_T = 32, 6.6
# 3.0, 3.25, ..., 12.0 logits and the fixed choices: "calib" is never worse than a fixed T on the
# calibration rows (the error is not smooth in T: T_int = round(T / S) moves in steps)
T_CALIB_GRID = tuple(sorted({x / 4 for x in range(12, 49)} | {DEFAULT_T, 4.0, 5.0, 8.0, 10.0}))
CALIB_ROWS = 2048  # rows kept for the choice of T (the most recent calibration rows)

FAMILY = register_family(Family(
    name="index", title="IndexSoftmax", color="tab:purple",
    paper="Zhong et al., IntAttention (IndexSoftmax), MLSys 2026",
    # per element: max and clip (2 compare), d and the sum (2 add), the index as a multiply-high by a
    # reciprocal of T_int (1 mul, 1 shift), the table (1 lookup), normalisation e*L*f (2 mul), the
    # rounding add and shift, the clamp; per row: the reciprocal of the sum (1 div)
    cost={"softmax": {"element": {"add": 3, "mul": 3, "shift": 2, "compare": 3, "lookup": 1}, "row": {"div": 1}}},
    stand_ins={"gelu": "ibert", "layernorm": "ibert"},
))


def index_table(k_entries: int, t_logits: float) -> list[int]:
    """``round(255 exp(-k T / (K - 1)))`` for k < K - 1, and 0 last (the closed form)."""
    return [int(math.floor(AMPLITUDE * math.exp(-k * t_logits / (k_entries - 1)) + 0.5)) for k in range(k_entries - 1)] + [0]


@jit
def _index_softmax_kernel(q, out, t0, lo1, t1, levels, shift, out_scale):
    """The row part per row: ``f = ceil(2**shift / sum)``, ``p = min((e L f + 2**(shift-1)) >> shift, L)``."""
    buf = np.empty(q.shape[1], np.int64)
    one = np.int64(1) << shift
    half = np.int64(1) << (shift - 1)
    for r in range(q.shape[0]):
        total = _exp_rows(q, r, buf, t0, lo1, t1)
        if total <= 0 or total >= (np.int64(1) << 23):
            return False
        f = (one + total - 1) // total
        for c in range(q.shape[1]):
            p = (buf[c] * levels * f + half) >> shift
            if p > levels:
                p = levels
            out[r, c] = p * out_scale
    return True


@register_method("softmax", "index")
class IndexSoftmax(TableSoftmax):
    """IndexSoftmax (see the module docstring): ``K``-entry exponential table indexed by
    ``floor(min(rowmax - q, T_int) (K - 1) / T_int)``, one reciprocal per row, ``bits``-bit output.

    Args:
        K: table entries (16, 32, 64).
        T: clipping threshold in logits (a number of :attr:`PARAMS`), or ``"calib"``.
    """

    PARAMS = {"K": (DEFAULT_K, 16, 64), "T": (DEFAULT_T, "calib", 4.0, 5.0, 8.0, 10.0)}

    def __init__(self, bits: int = 8, float_module=None, fine_grid: bool = False, K: int = DEFAULT_K,
                 T: float | str = DEFAULT_T):
        super().__init__(bits, float_module, fine_grid)
        self.K, self.T = int(K), T
        # the calibrated threshold (logits; 0: not calibrated yet, the default T is used)
        self.register_buffer("t_calib", torch.zeros((), dtype=torch.float64))
        self._rows: list[torch.Tensor] = []

    # --- the kernel ------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        """T in logits: the parameter, or the calibrated value for ``T="calib"``."""
        if self.T == "calib":
            t = float(self.t_calib)
            return t if t > 0 else DEFAULT_T
        return float(self.T)

    def t_int(self, s_x: float, t_logits: float | None = None) -> int:
        return max(1, int(math.floor((self.threshold if t_logits is None else t_logits) / s_x + 0.5)))

    def _exp(self, q_rel: torch.Tensor, s_x: float, t_logits: float | None = None) -> torch.Tensor:
        t_int = self.t_int(s_x, t_logits)
        table = torch.tensor(index_table(self.K, self.threshold if t_logits is None else t_logits),
                             dtype=torch.int64, device=q_rel.device)
        d = torch.clamp(-q_rel, max=t_int)
        idx = floor_div(d * (self.K - 1), t_int)
        return as_kind(table[idx.long()], q_rel)

    def exp_part(self, q_rel, s_x, row_len):
        return self._exp(q_rel, s_x)

    def row_part(self, e):
        total = check_range(e.sum(dim=-1, keepdim=True), "index softmax sum", bits=23, signed=False)
        total = torch.clamp(total, min=1)
        f = floor_div(2**RECIPROCAL_SHIFT + total - 1, total)  # ceil(2**40 / sum), one per row
        levels = 2**self.bits - 1
        prod = check_range(e * levels * f + 2 ** (RECIPROCAL_SHIFT - 1), "index softmax product", bits=63)
        return torch.clamp(shr(prod, RECIPROCAL_SHIFT), max=levels)

    def out_scale(self):
        return 1.0 / (2**self.bits - 1)

    def cpu_row_kernel(self):
        return _index_softmax_kernel, lambda scale: (2**self.bits - 1, RECIPROCAL_SHIFT, scale)

    def plan_state(self):
        return (self.K, self.T, float(self.t_calib))

    # --- calibration of T ----------------------------------------------------------------------
    def observe(self, x, s_x):
        if self.T != "calib":
            return
        rows = x.detach().reshape(-1, x.shape[-1])
        step = max(1, rows.shape[0] // (CALIB_ROWS // 4))
        self._rows.append(rows[::step].double().cpu())
        while sum(r.shape[0] for r in self._rows) > CALIB_ROWS and len(self._rows) > 1:
            self._rows.pop(0)
        errors = self.threshold_errors(torch.cat(self._rows), float(s_x))
        errors = all_reduce_(errors.to(self.t_calib.device), "sum")
        self.t_calib.fill_(T_CALIB_GRID[int(errors.argmin())])

    @torch.no_grad()
    def threshold_errors(self, x: torch.Tensor, s_x: float) -> torch.Tensor:
        """Sum of squared errors of the probabilities against the float softmax of ``x`` (rows of
        dequantized logits on the grid of ``s_x``), for each T of :data:`T_CALIB_GRID`."""
        q = torch.floor(x / s_x + 0.5)
        ref = torch.softmax(q * s_x, dim=-1)
        q_rel = q - q.amax(dim=-1, keepdim=True)
        out = []
        for t in T_CALIB_GRID:
            p = self.row_part(self._exp(q_rel, s_x, t)) * self.out_scale()
            out.append(float(((p - ref) ** 2).sum()))
        return torch.tensor(out, dtype=torch.float64)

    def reset_calibration(self):
        self.t_calib.zero_()
        self._rows = []

    def extra_repr(self):
        return super().extra_repr() + f", K={self.K}, T={self.T}"
