"""Output SQNR of every integer method against the exact float op, on the realistic inputs of
``mnq_search.testing`` (the numbers behind tests/methods_tests/test_accuracy.py's floors).

Prints a Markdown table: op, method, SQNR at 8 and 6 bits, and the input scale. With
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
    args = ap.parse_args()
    print(f"<!-- {_dt.date.today()} · torch {torch.__version__} · python benchmarks/accuracy_methods.py"
          f"{' --fine-grid' if args.fine_grid else ''} -->")
    head = "| op | method | SQNR 8-bit (dB) | SQNR 6-bit (dB) | s_x 8-bit | s_x 6-bit |"
    if args.fine_grid:
        head += " fine grid 8-bit | fine grid 6-bit |"
    print(head)
    print("|---|---|" + "---:|" * (head.count("|") - 3))
    for op, methods in NONLINEAR_METHODS.items():
        for m in methods:
            (a8, s8), (a6, s6) = measure(op, m, 8), measure(op, m, 6)
            row = f"| {op} | {m} | {a8:.2f} | {a6:.2f} | {s8:.4g} | {s6:.4g} |"
            if args.fine_grid:
                (f8, _), (f6, _) = measure(op, m, 8, fine_grid=True), measure(op, m, 6, fine_grid=True)
                row += f" {f8:.2f} | {f6:.2f} |"
            print(row)


if __name__ == "__main__":
    main()
