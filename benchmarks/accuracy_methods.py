"""Output SQNR of every integer method against the exact float op, on the realistic inputs of
``mnq_search.testing`` (the numbers behind tests/methods_tests/test_accuracy.py's floors).

Prints a Markdown table: op, method, SQNR at each of ``--bits`` (default 8 and 6), and the input
scales. With
``--fine-grid`` it adds the SQNR when the exponential/erf kernels first move their integers to a
grid no coarser than 2**-6 (an exact left shift; not the default numerics, see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnq_search.methods import NONLINEAR_METHODS  # noqa: E402
from mnq_search.testing import method_sqnr  # noqa: E402


measure = method_sqnr


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fine-grid", action="store_true")
    ap.add_argument("--bits", default="8,6", help="comma-separated bit-widths (default 8,6)")
    args = ap.parse_args()
    try:
        bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        ap.error(f"--bits {args.bits}: give comma-separated integers, e.g. 8,6,4")
    print(f"<!-- {_dt.date.today()} · torch {torch.__version__} · python benchmarks/accuracy_methods.py"
          f"{' --fine-grid' if args.fine_grid else ''} --bits {args.bits} -->")
    head = ("| op | method | " + " | ".join(f"SQNR {b}-bit (dB)" for b in bits) + " | "
            + " | ".join(f"s_x {b}-bit" for b in bits) + " |")
    if args.fine_grid:
        head += "".join(f" fine grid {b}-bit |" for b in bits)
    print(head)
    print("|---|---|" + "---:|" * (head.count("|") - 3))
    for op, methods in NONLINEAR_METHODS.items():
        for m in methods:
            got = [measure(op, m, b) for b in bits]
            row = (f"| {op} | {m} | " + " | ".join(f"{a:.2f}" for a, _ in got) + " | "
                   + " | ".join(f"{s:.4g}" for _, s in got) + " |")
            if args.fine_grid:
                row += "".join(f" {measure(op, m, b, fine_grid=True)[0]:.2f} |" for b in bits)
            print(row)


if __name__ == "__main__":
    main()
