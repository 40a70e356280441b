"""Shared look of the report's plots: one colour per method and per strategy, the paper's slot
labels (``2.softmax``: 1-based position among all non-linear layers in forward order, as in the
paper's Figures 1-3), and a headless PNG writer.

Plots are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through
``pyplot``, so no display and no global backend are involved.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..io import atomic_path
from ..methods import OPS as OPS  # noqa: F401 (the ops, in the report's order)
from ..methods import get_family

OP_TITLES = {"softmax": "Softmax", "gelu": "GELU", "layernorm": "LayerNorm"}
FLOAT_COLOR = "tab:gray"
OURS = "sqnr_diff"  # the paper's rule, drawn in red as in its Figure 3
OURS_COLOR = "tab:red"
_OTHER_COLORS = ("tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink",
                 "tab:olive", "tab:cyan", "tab:gray")
DPI = 110


def method_color(method: str) -> str:
    """The colour a method family declares (grey for the float op, purple for an unknown name)."""
    if method == "float":
        return FLOAT_COLOR
    try:
        return get_family(method).color
    except ValueError:
        return "tab:purple"


def method_title(method: str) -> str:
    """The display name a method family declares (``I-BERT``), or the name itself."""
    if method == "float":
        return "float"
    try:
        return get_family(method).title
    except ValueError:
        return method


def strategy_colors(strategies: Iterable[str]) -> dict[str, str]:
    """A stable colour per strategy label; the paper's rule (``sqnr_diff``) is red."""
    out, others = {}, iter(_OTHER_COLORS * 4)
    for name in strategies:
        out[name] = OURS_COLOR if name.split(" ")[0] == OURS else next(others)
    return out


def slot_labels(slots: Iterable[str], slot_ops: dict[str, str]) -> dict[str, str]:
    """``{slot: "N.op"}`` with N the 1-based forward position, e.g. ``blocks.0.attn.softmax -> 2.softmax``."""
    return {s: f"{i}.{slot_ops[s]}" for i, s in enumerate(slots, start=1)}


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as PNG through a temporary file (never half-written)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return path


def slug(*parts: object) -> str:
    """A file-name-safe join of ``parts``: ``slug("fmnist-deit-tiny", "8bit") -> fmnist-deit-tiny_8bit``."""
    text = "_".join(str(p) for p in parts if p not in (None, ""))
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "x"
