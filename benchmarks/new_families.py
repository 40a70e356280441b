"""The two method families of issue 13 against their parameters, calibrated on one input and measured
on a held-out one (BENCHMARKS.md section 1b).

- ``polyfit`` GELU: I-BERT's fixed erf polynomial (default and ``--fine-grid`` numerics) against the
  coefficients fitted on the calibration input, degree 2 (I-BERT's form, refitted) and degree 4.
- ``index`` softmax: every table size K and clipping threshold T the search space offers.

Calibration input: ``mnq_search.testing.realistic_input(op, bits, seed=0)``; the held-out input is the
same generator with seed 1, quantized to the *calibration* scale (as a calibrated model quantizes
new images). SQNR in dB of the integer method's output against the float op on the same quantized
input. Prints Markdown and writes it to benchmarks/results/new_families.md.

Usage: python benchmarks/new_families.py [--bits 8,6,4]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from mnq_search.methods import make_nonlinear  # noqa: E402
from mnq_search.testing import realistic_input, sqnr_db  # noqa: E402


def held_out(op: str, bits: int):
    """(calibration x, its scale, held-out x on the calibration grid)."""
    x0, s = realistic_input(op, bits, seed=0)
    x1, _ = realistic_input(op, bits, seed=1)
    lim = 2 ** (bits - 1)
    return x0, s, torch.clamp(torch.round(x1 / s), -lim, lim - 1) * s


def sqnr(op: str, method: str, bits: int, **params) -> tuple[float, float]:
    """(SQNR on the calibration input, SQNR on the held-out input)."""
    x0, s, x1 = held_out(op, bits)
    mod = make_nonlinear(op, method, bits, **params)
    mod.train()
    with torch.no_grad():
        mod(x0, s)
    mod.eval()
    out = []
    with torch.no_grad():
        for x in (x0, x1):
            y, _ = mod(x, s)
            out.append(sqnr_db(mod.float_op(x), y))
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="8,6,4")
    args = ap.parse_args()
    try:
        bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        ap.error(f"--bits {args.bits}: give comma-separated integers, e.g. 8,6,4")
    lines = [f"<!-- {_dt.date.today()} · torch {torch.__version__} · python benchmarks/new_families.py "
             f"--bits {args.bits} -->", "",
             "GELU, SQNR in dB (calibration input / held-out input):", "",
             "| GELU | " + " | ".join(f"{b}-bit" for b in bits) + " |", "|---|" + "---:|" * len(bits)]
    gelu = [("I-BERT (fixed coefficients)", "ibert", {}), ("I-BERT, fine grid", "ibert", {"fine_grid": True}),
            ("polyfit degree 2 (I-BERT's form, fitted)", "polyfit", {"degree": 2}),
            ("polyfit degree 4", "polyfit", {"degree": 4})]
    for label, method, params in gelu:
        cells = [sqnr("gelu", method, b, **params) for b in bits]
        lines.append(f"| {label} | " + " | ".join(f"{a:.1f} / {h:.1f}" for a, h in cells) + " |")
    lines += ["", "Softmax `index`, SQNR in dB on the held-out input (T in logits; `calib`: chosen on the "
              "calibration input):", "",
              "| K | T | " + " | ".join(f"{b}-bit" for b in bits) + " |", "|---:|---|" + "---:|" * len(bits)]
    for K in (16, 32, 64):
        for T in (4.0, 5.0, 6.6, 8.0, 10.0, "calib"):
            cells = [sqnr("softmax", "index", b, K=K, T=T)[1] for b in bits]
            lines.append(f"| {K} | {T} | " + " | ".join(f"{h:.1f}" for h in cells) + " |")
    for name in ("ibert", "ivit"):
        cells = [sqnr("softmax", name, b)[1] for b in bits]
        lines.append(f"| ({name}) | | " + " | ".join(f"{h:.1f}" for h in cells) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = ROOT / "benchmarks" / "results" / "new_families.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(out)


if __name__ == "__main__":
    main()
