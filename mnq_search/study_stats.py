"""Paired statistics of a recorded study (issue 17): every strategy against the best uniform method.

For each setting (model, linear bits, non-linear bits) and regime:

- **PTQ**: the baseline is the uniform assignment with the highest *validation* top-1 (selected on
  validation, reported on the test set); every other cell of the setting is compared with it on the
  same test images: paired difference, 95 % paired-bootstrap interval, exact McNemar p
  (:mod:`mnq_search.stats`);
- **QAT phase**: the best greedy rule's and the best searched assignment's QAT runs against the
  best uniform's QAT run of the same seed.

Holm's correction runs across every comparison of the table. On the accuracy x cost plane a cell
*dominates* a uniform cell of its setting when it is at least as accurate on the test set at no
more cost, and better in one of the two; this is reported per cost table (the families' integer
operation counts, and each table of the spec's ``cost_tables``).

Outputs: ``<results_dir>/<name>_stats.csv`` (one row per comparison), ``<name>.png`` (per
setting, each strategy's difference to the best uniform method with its interval) and
``<name>_summary.csv`` / ``.md`` (one line per setting: :mod:`mnq_search.study_summary`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io import atomic_write_text, csv_text
from .stats import holm, paired_comparison, unpack
from .study_summary import write_summary

STATS_FIELDS = ("model", "bits", "nl_bits", "regime", "seed", "strategy", "baseline", "top1", "top1_baseline",
                "top1_val", "top1_val_baseline", "diff", "lo", "hi", "p", "p_holm", "a_only", "b_only", "n", "cell",
                "qat_of")


def _correct(spec, row) -> np.ndarray | None:
    path = Path(spec.work_dir) / "runs" / row["cell"] / "correct.npz"
    if not path.is_file():
        return None
    with np.load(path) as z:
        return unpack(z["test"], int(z["n"]))


def comparisons(spec, rows: list[dict]) -> list[dict]:
    """The rows of ``<name>_stats.csv`` (Holm-adjusted across all of them)."""
    from .study import best_on_validation, cost_columns, strategy_kind

    out = []
    costs = cost_columns(rows)
    settings = list(dict.fromkeys((r["model"], r["bits"], r.get("nl_bits")) for r in rows if r["strategy"] != "float"))
    for model, bits, nl in settings:
        cells = [r for r in rows if (r["model"], r["bits"], r.get("nl_bits")) == (model, bits, nl)
                 and r["strategy"] != "float"]
        ptq = [r for r in cells if r.get("regime") == "ptq"]
        uniform = [r for r in ptq if strategy_kind(r["strategy"]) == "uniform" and r.get("top1_val") is not None]
        base = best_on_validation(uniform)
        if base is None:
            continue
        pairs = [(r, base, "ptq") for r in ptq if r is not base]
        qat = [r for r in cells if r.get("regime") == "qat" and r.get("qat_of")]
        for r in qat:
            b = next((q for q in qat if q.get("qat_of") == base["cell"] and q.get("seed") == r.get("seed")), None)
            if b is not None and r is not b:
                pairs.append((r, b, "qat"))
        for r, b, regime in pairs:
            a_bits, b_bits = _correct(spec, r), _correct(spec, b)
            if a_bits is None or b_bits is None:
                continue
            stat = paired_comparison(a_bits, b_bits)
            row = dict(model=model, bits=bits, nl_bits=nl, regime=regime, seed=r.get("seed"), strategy=r["strategy"],
                       baseline=b["strategy"], top1=r["top1"], top1_baseline=b["top1"], top1_val=r.get("top1_val"),
                       top1_val_baseline=b.get("top1_val"), **{k: round(v, 6) if isinstance(v, float) else v
                                                               for k, v in stat.items()},
                       cell=r.get("cell"), qat_of=r.get("qat_of"))
            for c in costs:
                row[c] = r.get(c)
                row[f"{c}_baseline"] = b.get(c)
                if regime == "ptq" and strategy_kind(r["strategy"]) != "uniform":
                    dominated = [u["strategy"] for u in uniform if r.get(c) is not None and u.get(c) is not None
                                 and r["top1"] >= u["top1"] and r[c] <= u[c] and (r["top1"] > u["top1"] or r[c] < u[c])]
                    row[f"dominates_{c}"] = ";".join(dominated)
            out.append(row)
    for row, p in zip(out, holm([r["p"] for r in out])):
        row["p_holm"] = round(p, 6)
    return out


def write_statistics(spec, rows: list[dict]) -> Path | None:
    table = comparisons(spec, rows)
    if not table:
        return None
    extra = list(dict.fromkeys(k for r in table for k in r if k not in STATS_FIELDS))  # uniform rows: no dominates_
    path = Path(spec.results_dir) / f"{spec.name}_stats.csv"
    atomic_write_text(path, csv_text(STATS_FIELDS + tuple(extra), table))
    figure(spec, table)
    write_summary(spec, table, rows)
    return path


def figure(spec, table: list[dict]) -> Path:
    """Per setting, every strategy's paired difference to the best uniform method (PTQ, and QAT
    phase where there is one), with its 95 % interval; Holm-significant ones filled."""
    from .report._style import new_figure, save_png

    settings = list(dict.fromkeys((r["model"], r["bits"], r["nl_bits"]) for r in table))
    cols = min(4, len(settings))
    rows_n = (len(settings) + cols - 1) // cols
    height = max(len([r for r in table if (r["model"], r["bits"], r["nl_bits"]) == s]) for s in settings)
    fig = new_figure(4.2 * cols, max(2.5, 0.22 * height + 1.2) * rows_n)
    axes = fig.subplots(rows_n, cols, squeeze=False)
    for ax, (model, bits, nl) in zip(axes.flat, settings):
        rs = [r for r in table if (r["model"], r["bits"], r["nl_bits"]) == (model, bits, nl)]
        labels = [f"{r['strategy']}{' s' + str(r['seed']) if r['seed'] is not None else ''}"
                  f"{' [QAT]' if r['regime'] == 'qat' else ''}" for r in rs]
        y = np.arange(len(rs))
        for i, r in enumerate(rs):
            sig = r["p_holm"] < 0.05
            color = "tab:green" if r["diff"] > 0 and sig else "tab:red" if r["diff"] < 0 and sig else "tab:gray"
            ax.plot([r["lo"], r["hi"]], [i, i], color=color, lw=1.5)
            ax.plot([r["diff"]], [i], "o", color=color, markersize=4, fillstyle="full" if sig else "none")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y, labels, fontsize=6)
        ax.invert_yaxis()
        ax.set_title(f"{model} w{bits} nl{nl}\nvs {rs[0]['baseline']}", fontsize=7)
        ax.set_xlabel("top-1 difference (points), 95 % CI", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    for ax in list(axes.flat)[len(settings):]:
        ax.set_visible(False)
    return save_png(fig, Path(spec.results_dir) / f"{spec.name}.png")

