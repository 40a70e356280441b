"""The fidelity cells of issue 11: the project's I-ViT ShiftGELU and FQ-ViT LayerNorm against the
official modules' numerics (restated in tests/official_semantics.py) on ViT-like inputs with
long-tailed channels at five input scales; SQNR in dB against the exact float op on the same
quantized input. Prints a Markdown table.   Usage: python benchmarks/fidelity_official.py
"""

from __future__ import annotations

import datetime as _dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.official_semantics import SCALES, fidelity_cell  # noqa: E402


def main() -> None:
    print(f"<!-- {_dt.date.today().isoformat()} · python benchmarks/fidelity_official.py -->")
    print("| op | method | bits | " + " | ".join(f"x{s}: ours / official" for s in SCALES) + " |")
    print("|---|---|---|" + "---:|" * len(SCALES))
    for op, method in (("gelu", "ivit"), ("layernorm", "fqvit")):
        for bits in (8, 6):
            rows = fidelity_cell(op, method, bits)
            print(f"| {op} | {method} | {bits} | " + " | ".join(f"{a:.1f} / {b:.1f}" for _, a, b in rows) + " |")


if __name__ == "__main__":
    main()
