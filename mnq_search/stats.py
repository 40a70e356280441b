"""Paired statistics for comparing two assignments on the same test images (issue 17).

Each comparison takes the per-image correctness of two models on the same images:

- the **paired difference** of top-1 in percentage points;
- a **95 % paired-bootstrap interval**: images resampled with replacement, both models kept
  together. The difference only depends on how many resampled images each model alone gets right,
  so a resample is one multinomial draw of the counts (a wins, b wins, tie) with the observed
  frequencies: the same distribution as resampling image indices, at no cost per image;
- **exact McNemar** p-value: under no difference, the images exactly one model gets right split
  like a fair coin (two-sided binomial test on the discordant pairs, scipy);
- **Holm's** step-down correction of a family of p-values (a table of comparisons).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import binomtest

N_BOOT = 10_000


def paired_comparison(a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                      level: float = 0.95) -> dict[str, float]:
    """``a`` vs ``b``: per-image correctness (bool arrays of one length). Returns ``diff`` (points),
    ``lo``, ``hi`` (the bootstrap interval), ``p`` (exact McNemar), ``a_only``, ``b_only`` (the
    discordant counts) and ``n``."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or not a.size:
        raise ValueError("paired_comparison needs two boolean vectors of one length")
    n = a.size
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    diff = 100.0 * (a_only - b_only) / n
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, [a_only / n, b_only / n, 1 - (a_only + b_only) / n], size=n_boot)
    boot = 100.0 * (counts[:, 0] - counts[:, 1]) / n
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    discordant = a_only + b_only
    p = 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)
    return {"diff": diff, "lo": float(lo), "hi": float(hi), "p": p, "a_only": a_only, "b_only": b_only, "n": n}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the order given (step-down: the k-th smallest times (m - k + 1),
    made non-decreasing, capped at 1)."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def holm_adjust(comparisons: Sequence[dict]) -> None:
    """Add ``p_holm`` to each :func:`paired_comparison` result, Holm-adjusted across all of them."""
    for c, p in zip(comparisons, holm([c["p"] for c in comparisons])):
        c["p_holm"] = p


def comparison_columns(c: dict | None, diff_key: str = "diff") -> dict[str, str]:
    """A comparison (with ``p_holm``) as CSV columns; empty strings for the reference row (None)."""
    if not c:
        return {diff_key: "", "lo": "", "hi": "", "p_mcnemar": "", "p_holm": ""}
    return {diff_key: f"{c['diff']:.2f}", "lo": f"{c['lo']:.2f}", "hi": f"{c['hi']:.2f}",
            "p_mcnemar": f"{c['p']:.3g}", "p_holm": f"{c['p_holm']:.3g}"}


def comparison_cells(c: dict | None) -> tuple[str, str]:
    """A comparison as Markdown cells: ``+d [lo, hi]`` (``(reference)`` for None) and the Holm p."""
    if not c:
        return "(reference)", ""
    return f"{c['diff']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]", f"{c['p_holm']:.2g}"


def pack(correct: np.ndarray) -> np.ndarray:
    """Per-image correctness as bits (what a study stores per cell)."""
    return np.packbits(np.asarray(correct, dtype=bool))


def unpack(bits: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bits)[:n].astype(bool)
