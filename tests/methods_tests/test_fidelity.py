"""The three cells where the methods fell more than 1 dB below the official modules (issue 11):
I-ViT ShiftGELU at 8 and 6 bits and FQ-ViT LayerNorm at 6 bits (and 8), on ViT-like inputs with
long-tailed channels at five input scales, against the official numerics restated in
``tests/official_semantics.py``. Every scale must be within 1 dB of the official module or better.

Measured (2026-11-30; BENCHMARKS.md section 1): ShiftGELU 18.7-42.1 dB against the official
8.6-15.0 (it was 4.0-10.9: the 1.702 done with shifts and the row maximum's saturation), FQ-ViT
LayerNorm 30.4 / 18.3 dB equal to the official (it was 2.3 dB below: a symmetric output grid).
"""

from __future__ import annotations

import pytest

from tests.official_semantics import SCALES, fidelity_cell


@pytest.mark.parametrize("op, method, bits", [("gelu", "ivit", 8), ("gelu", "ivit", 6),
                                              ("layernorm", "fqvit", 8), ("layernorm", "fqvit", 6)])
def test_within_one_db_of_the_official_module(op, method, bits):
    rows = fidelity_cell(op, method, bits)
    assert [r[0] for r in rows] == list(SCALES)
    for scale, ours, official in rows:
        assert ours >= official - 1.0, f"{op} {method} {bits}-bit at input scale x{scale}: {ours:.2f} < {official:.2f} - 1"
