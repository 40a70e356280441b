"""Plots of low-bit runs: the bit-width of every weight layer as a heat map (Mix-QViT allocations,
``layer_bits`` of an assignment file) and the weight oscillation rate per QAT epoch (``oscillation.csv``
of a ``--qat-recipe vvtq`` run).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ._style import new_figure

_SPLIT = re.compile(r"^(?P<row>.+?)\.(?P<col>(?:attn|mlp)\..+)$")  # "blocks.3" + "attn.qkv"


def bits_grid(layer_bits: Mapping[str, int | str], part: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """(rows, columns, bits) of a heat map: one row per block (``blocks.3``, ``layers.1.blocks.0``) and
    one column per layer kind in the block (``attn.qkv``, ``mlp.fc1``); layers outside blocks (patch
    embedding, head) share a last row ``other``. Cells without a layer are NaN. Values are ``b`` or
    ``"wXaY"``; ``part`` 0 maps the weight bits, 1 the input bits."""
    from ..budget import bits_pair

    rows: list[str] = []
    cols: list[str] = []
    cells: dict[tuple[str, str], int] = {}
    for name, value in layer_bits.items():
        m = _SPLIT.match(name)
        row, col = (m["row"], m["col"]) if m else ("other", name)
        if row not in rows:
            rows.append(row)
        if col not in cols:
            cols.append(col)
        pair = bits_pair(value)
        if pair is None:
            raise ValueError(f"layer_bits of {name}: {value!r} is not a bit-width or 'wXaY'")
        cells[row, col] = pair[part]
    if "other" in rows:  # outside the blocks: last
        rows.remove("other")
        rows.append("other")
    grid = np.full((len(rows), len(cols)), np.nan)
    for (r, c), b in cells.items():
        grid[rows.index(r), cols.index(c)] = b
    return rows, cols, grid


def plot_bits_heatmap(layer_bits: Mapping[str, int | str], title: str) -> Figure:
    """Each weight layer's bit-width as a heat map with the values written in: the colour is the weight
    bits, the text ``b`` (weights and inputs) or ``w/a`` where the input bits differ. Softmax and GELU
    slots (``attn.softmax``, ``mlp.act`` columns) have one width, their input's."""
    rows, cols, grid = bits_grid(layer_bits)
    agrid = bits_grid(layer_bits, part=1)[2]
    fig = new_figure(1.6 + 1.0 * len(cols), 1.2 + 0.3 * len(rows))
    ax = fig.add_subplot()
    lo, hi = np.nanmin(grid), np.nanmax(grid)
    im = ax.imshow(grid, cmap="viridis", vmin=lo - 0.5, vmax=hi + 0.5, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            if not np.isnan(grid[i, j]):
                w, a = int(grid[i, j]), int(agrid[i, j])
                ax.text(j, i, f"{w}" if w == a else f"{w}/{a}", ha="center", va="center", fontsize=7,
                        color="white" if grid[i, j] < (lo + hi) / 2 else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("text: bits of weights and inputs, w/a where they differ; Softmax and GELU slots: their input's",
                  fontsize=7)
    fig.colorbar(im, ax=ax, ticks=range(int(lo), int(hi) + 1), label="bits (weights)")
    return fig


def read_oscillation(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``oscillation.csv`` as layer -> [(epoch, rate)]."""
    out: dict[str, list[tuple[int, float]]] = {}
    with Path(path).open(newline="") as f:
        for row in csv.DictReader(f):
            out.setdefault(row["layer"], []).append((int(row["epoch"]), float(row["rate"])))
    return out


def plot_oscillation(rates: Mapping[str, list[tuple[int, float]]], overall: list[tuple[int, float]] | None,
                     title: str) -> Figure:
    """Oscillation rate (fraction of a layer's weights that flipped in the epoch) per epoch: the
    mean over the blocks of each layer kind, and the weight-weighted mean over all layers."""
    kinds: dict[str, list[list[tuple[int, float]]]] = {}
    for name, series in rates.items():
        m = _SPLIT.match(name)
        kinds.setdefault(m["col"] if m else name, []).append(series)
    fig = new_figure(6.0, 3.4)
    ax = fig.add_subplot()
    for kind, group in kinds.items():
        epochs = sorted({e for s in group for e, _ in s})
        means = [np.mean([r for s in group for e2, r in s if e2 == e]) for e in epochs]
        ax.plot(epochs, means, marker=".", lw=1, label=kind)
    if overall:
        ax.plot([e for e, _ in overall], [r for _, r in overall], color="black", lw=2, label="all (weighted)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("oscillation rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return fig
