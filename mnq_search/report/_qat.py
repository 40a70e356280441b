"""The paper's Figures 3 and 4, from QAT folders: per-slot output ASQNR after QAT, one line per
strategy (Figure 3), and top-1 per epoch, one line per strategy (Figure 4). Runs are grouped by
model and bit-width; the paper's rule (``sqnr_diff``) is drawn in red as in the paper.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
from matplotlib.figure import Figure

from ._inputs import Folder
from ._style import OP_TITLES, OPS, OURS, new_figure, slot_labels, strategy_colors

GroupKey = tuple[str, "int | None"]


def group_by_model(folders: Sequence[Folder], keep: Callable[[Folder], object]) -> dict[GroupKey, list[Folder]]:
    """Folders for which ``keep`` is truthy, grouped by (model, bits) in first-seen order."""
    groups: dict[GroupKey, list[Folder]] = {}
    for f in folders:
        if keep(f):
            groups.setdefault((f.model, f.bits), []).append(f)
    return groups


def strategy_names(folders: Sequence[Folder]) -> list[str]:
    """Each folder's strategy, with its folder added where two folders share one."""
    seen = Counter(f.strategy for f in folders)
    return [f.strategy if seen[f.strategy] == 1 else f"{f.strategy} ({f.label})" for f in folders]


def group_title(key: GroupKey) -> str:
    model, bits = key
    return f"{model} · {bits}-bit" if bits is not None else model


def plot_qat_asqnr(folders: Sequence[Folder], title: str) -> Figure:
    """Figure 3: per-slot output ASQNR after QAT (``slot_asqnr.csv``), one line per strategy,
    one panel per op."""
    slot_ops: dict[str, str] = {}
    for f in folders:
        for r in f.slot_asqnr or []:
            slot_ops.setdefault(str(r["slot"]), str(r["op"]))
    labels = slot_labels(slot_ops, slot_ops)
    ops = [op for op in OPS if op in slot_ops.values()]
    names = strategy_names(folders)
    colors = strategy_colors(names)
    widest = max(sum(1 for o in slot_ops.values() if o == op) for op in ops)
    fig = new_figure(min(20.0, max(8.0, 2.5 + 0.35 * widest)), 3.0 * len(ops))
    fig.suptitle(title)
    for ax, op in zip(fig.subplots(len(ops), 1, squeeze=False)[:, 0], ops):
        slots = [s for s, o in slot_ops.items() if o == op]
        index = {s: i for i, s in enumerate(slots)}
        for f, name in zip(folders, names):
            mine = [r for r in f.slot_asqnr or [] if r["slot"] in index]
            ours = name.split(" ")[0] == OURS
            ax.plot([index[r["slot"]] for r in mine], [r["asqnr_out"] for r in mine], marker="o", markersize=3,
                    linewidth=2.0 if ours else 1.2, color=colors[name], label=name, zorder=3 if ours else 2)
        ax.set_xticks(range(len(slots)), [labels[s] for s in slots], rotation=90, fontsize=7)
        ax.set_ylabel("output ASQNR (dB)")
        ax.set_title(OP_TITLES.get(op, op), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def top1_per_epoch(history: Sequence[dict]) -> tuple[list[float], list[float]]:
    """(epochs, top-1): the last evaluation of each epoch, in epoch order."""
    last: dict[float, float] = {}
    for r in history:
        if isinstance(r.get("epoch"), float) and isinstance(r.get("top1"), float):
            last[r["epoch"]] = r["top1"]
    epochs = sorted(last)
    return epochs, [last[e] for e in epochs]


def plot_top1_history(folders: Sequence[Folder], title: str) -> Figure:
    """Figure 4: QAT training curves, top-1 per epoch, one line per strategy."""
    names = strategy_names(folders)
    colors = strategy_colors(names)
    fig = new_figure(7.5, 4.5)
    ax = fig.subplots()
    for f, name in zip(folders, names):
        epochs, top1 = top1_per_epoch(f.history or [])
        ours = name.split(" ")[0] == OURS
        ax.plot(epochs, top1, marker="o", markersize=4, linewidth=2.0 if ours else 1.2, color=colors[name],
                label=name, zorder=3 if ours else 2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    all_epochs = [e for f in folders for e in top1_per_epoch(f.history or [])[0]]
    if all_epochs and max(all_epochs) <= 20:
        ax.set_xticks(np.arange(min(all_epochs), max(all_epochs) + 1))
    ax.legend(fontsize=8)
    return fig
