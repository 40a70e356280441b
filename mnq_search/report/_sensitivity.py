"""The paper's Figure 1: layer-wise sensitivity of the non-linear slots, one panel per op.

Bars: each method's SQNR diff per slot (Eq. 11, left axis); lines: each method's output ASQNR
(right axis). Read from a run's ``sensitivity.csv``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ._style import OP_TITLES, OPS, method_color, method_title, new_figure, slot_labels


def sensitivity_slots(rows: Sequence[dict]) -> tuple[list[str], dict[str, str]]:
    """Slots in file (forward) order and their ops."""
    slot_ops: dict[str, str] = {}
    for r in rows:
        slot_ops.setdefault(str(r["slot"]), str(r["op"]))
    return list(slot_ops), slot_ops


def sensitivity_labels(rows: Sequence[dict]) -> dict[str, str]:
    """The paper-style label (``2.softmax``) of every slot of a sensitivity table."""
    slots, slot_ops = sensitivity_slots(rows)
    return slot_labels(slots, slot_ops)


def plot_sensitivity(rows: Sequence[dict], title: str) -> Figure:
    """Figure 1: SQNR diff bars and output-ASQNR lines per method, one row of axes per op.

    Args:
        rows: ``sensitivity.csv`` rows (slot, op, method, asqnr_in, asqnr_out, sqnr_diff).
        title: the figure's title (model, bits).
    """
    slots, slot_ops = sensitivity_slots(rows)
    labels = slot_labels(slots, slot_ops)
    ops = [op for op in OPS if op in slot_ops.values()]
    widest = max(sum(1 for s in slots if slot_ops[s] == op) for op in ops)
    fig = new_figure(min(22.0, max(9.0, 3.0 + 0.42 * widest)), 3.3 * len(ops))
    fig.suptitle(title)
    for ax, op in zip(fig.subplots(len(ops), 1, squeeze=False)[:, 0], ops, strict=True):
        _draw_op(ax, [r for r in rows if r["op"] == op], [s for s in slots if slot_ops[s] == op], labels, op)
    fig.legend(handles=_legend(list(dict.fromkeys(str(r["method"]) for r in rows))), loc="outside lower center",
               ncol=6, fontsize=8)
    return fig


def _draw_op(ax, rows: Sequence[dict], slots: list[str], labels: dict[str, str], op: str) -> None:
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    index = {s: i for i, s in enumerate(slots)}
    width = 0.8 / len(methods)
    line_ax = ax.twinx()
    for k, method in enumerate(methods):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: index[r["slot"]])
        x = np.array([index[r["slot"]] for r in mine], dtype=float)
        color = method_color(method)
        ax.bar(x - 0.4 + width * (k + 0.5), [r["sqnr_diff"] for r in mine], width, color=color, alpha=0.75)
        line_ax.plot(x, [r["asqnr_out"] for r in mine], marker="o", markersize=3, linewidth=1.2, color=color)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(slots)), [labels[s] for s in slots], rotation=90, fontsize=7)
    ax.set_xlim(-0.6, len(slots) - 0.4)
    ax.set_ylabel("SQNR diff (dB), bars")
    line_ax.set_ylabel("output ASQNR (dB), lines")
    ax.set_title(OP_TITLES.get(op, op), fontsize=10)


def _legend(methods: list[str]) -> list:
    handles = [Patch(color=method_color(m), alpha=0.75, label=f"{method_title(m)} SQNR diff") for m in methods]
    return handles + [Line2D([], [], color=method_color(m), marker="o", markersize=3,
                             label=f"{method_title(m)} ASQNR out") for m in methods]
