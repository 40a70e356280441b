"""One line per setting of a recorded study (issue 17): does mixing win here?

From the paired statistics (:mod:`mnq_search.study_stats`), per (model, linear bits, non-linear
bits): the float model, the best uniform method, and the best greedy rule and the best searched
assignment, each *selected by validation top-1* (the same choice the QAT phase makes; test top-1
never selects) and reported on the test set with its paired difference to the best uniform
method, 95 % interval and Holm-adjusted p. The paper's rule as printed (``sqnr_diff``) gets its own
column, and the QAT phase its own where it ran.

Outputs: ``<results_dir>/<name>_summary.csv`` and ``.md``.
"""

from __future__ import annotations

from pathlib import Path

from .io import atomic_write_text, csv_text
from .study import best_on_validation, ptq_cells_by_setting, strategy_kind

PAPER_RULE = "sqnr_diff"
SUMMARY_FIELDS = ("model", "bits", "nl_bits", "float", "uniform", "top1_uniform",
                  "greedy", "top1_greedy", "diff_greedy", "lo_greedy", "hi_greedy", "p_holm_greedy",
                  "search", "top1_search", "diff_search", "lo_search", "hi_search", "p_holm_search",
                  "diff_paper_rule", "lo_paper_rule", "hi_paper_rule", "p_holm_paper_rule",
                  "qat_uniform", "qat_diff_greedy", "qat_lo_greedy", "qat_hi_greedy", "qat_p_holm_greedy",
                  "qat_diff_search", "qat_lo_search", "qat_hi_search", "qat_p_holm_search", "qat_seed", "qat_seeds",
                  "search_dominates", "cells", "verdict")


def _label(r: dict) -> str:
    return r["strategy"] + (f" (seed {r['seed']})" if r.get("seed") is not None else "")


def verdict(diff: float | None, p_holm: float | None, alpha: float = 0.05) -> str:
    """``wins`` / ``loses`` (Holm-adjusted p below ``alpha``) or ``within noise``."""
    if diff is None or p_holm is None:
        return "not measured"
    return "within noise" if p_holm >= alpha else "wins" if diff > 0 else "loses"


def summary_rows(stats: list[dict], rows: list[dict], planned: dict[tuple, int] | None = None) -> list[dict]:
    """``stats``: the comparisons as :func:`mnq_search.study_stats.comparisons` returns them (numbers,
    not the CSV's text); ``rows``: the study's finished cells (the float model's top-1, and how many
    PTQ cells of each setting are in); ``planned``: the spec's number of PTQ cells per (model, bits,
    nl_bits). A setting with cells still missing says so in ``cells`` and its verdict is marked
    partial. The QAT columns are the chosen cells' own QAT runs, of the lowest QAT seed
    (``qat_seeds``: how many seeds ran)."""
    out = []
    settings = list(dict.fromkeys((r["model"], r["bits"], r["nl_bits"]) for r in stats))
    for model, bits, nl in settings:
        here = [r for r in stats if (r["model"], r["bits"], r["nl_bits"]) == (model, bits, nl)]
        ptq = [r for r in here if r["regime"] == "ptq"]
        fp = next((r["top1"] for r in rows if r["model"] == model and r["strategy"] == "float"
                   and r.get("regime") != "qat"), None)
        line = {"model": model, "bits": bits, "nl_bits": nl, "float": fp,
                "uniform": ptq[0]["baseline"] if ptq else None, "top1_uniform": ptq[0]["top1_baseline"] if ptq else None}
        chosen = {}  # kind -> the stats row chosen on validation
        for kind in ("greedy", "search"):
            best = chosen[kind] = best_on_validation([r for r in ptq if strategy_kind(r["strategy"]) == kind])
            if best is not None:
                line.update({kind: _label(best), f"top1_{kind}": best["top1"], f"diff_{kind}": best["diff"],
                             f"lo_{kind}": best["lo"], f"hi_{kind}": best["hi"], f"p_holm_{kind}": best["p_holm"]})
                if kind == "search":  # the uniform cells it beats at no more cost, per cost table
                    line["search_dominates"] = "; ".join(
                        f"{k[len('dominates_'):]}: {best[k] or 'none'}" for k in best if k.startswith("dominates_"))
        paper = next((r for r in ptq if r["strategy"] == PAPER_RULE), None)
        if paper is not None:
            line.update({f"{k}_paper_rule": paper[k] for k in ("diff", "lo", "hi", "p_holm")})
        qat = [r for r in here if r["regime"] == "qat"]
        seeds = sorted({r.get("seed") for r in qat}, key=lambda x: (x is None, x))
        if qat:
            seed = seeds[0]
            line.update(qat_uniform=next(r for r in qat if r.get("seed") == seed)["top1_baseline"], qat_seed=seed,
                        qat_seeds=len(seeds))
            for kind in ("greedy", "search"):
                r = next((q for q in qat if q.get("seed") == seed and chosen[kind] is not None
                          and q.get("qat_of") == chosen[kind].get("cell")), None)
                if r is not None:
                    line.update({f"qat_{k}_{kind}": r[k] for k in ("diff", "lo", "hi", "p_holm")})
        line["verdict"] = verdict(line.get("diff_search"), line.get("p_holm_search"))
        n = len([r for r in rows if (r["model"], r.get("bits"), r.get("nl_bits")) == (model, bits, nl)
                 and r.get("regime") == "ptq"])
        total = (planned or {}).get((model, bits, nl))
        line["cells"] = f"{n} of {total}" if total else str(n)
        if total and n < total:
            line["verdict"] += " (partial)"
        out.append(line)
    return out


def _num(v, fmt: str = "{:+.2f}") -> str:
    return "" if v is None or v == "" else fmt.format(float(v))


def _diff(line: dict, key: str, prefix: str = "") -> str:
    d = line.get(f"{prefix}diff_{key}")
    if d is None:
        return ""
    p = float(line[f"{prefix}p_holm_{key}"])
    lo, hi = _num(line[f"{prefix}lo_{key}"]), _num(line[f"{prefix}hi_{key}"])
    return f"{_num(d)} [{lo}, {hi}], p {'< 0.0001' if p < 1e-4 else f'{p:.2g}'}"


def _pick(line: dict, kind: str) -> str:
    """``name top-1 (Δ ...)`` of a setting's best greedy rule or search, or "not run yet"."""
    if not line.get(kind):
        return "not run yet"
    return f"{line[kind]} {_num(line.get(f'top1_{kind}'), '{:.2f}')} ({_diff(line, kind)})"


def markdown(lines: list[dict], name: str) -> str:
    out = [f"# Does mixing win? Study `{name}`, one line per setting", "",
           ("Selection on the validation split, top-1 (%) on the test set. Each difference is paired against "
            "the best uniform method (chosen on validation): points [95 % bootstrap interval], exact McNemar p "
            "Holm-adjusted across the study's comparisons. *Cells*: the setting's finished PTQ cells of those "
            "planned (a partial setting may still find a better assignment). *Greedy*: the best SQNR rule on validation; "
            "*search*: the best other strategy on validation (sequential, coordinate, per_op, Optuna, random); "
            f"the paper's rule as printed is `{PAPER_RULE}`. The verdict is the search's."), "",
           ("| model | linear / non-linear bits | float | best uniform | best greedy (Δ) | best search (Δ) "
            "| paper's rule Δ | QAT phase: uniform; greedy Δ; search Δ | uniform cells the search dominates "
            "(accuracy × cost) | cells | verdict |"),
           "|---|---|---:|---|---|---|---|---|---|---|---|"]
    for x in lines:
        qat = (f"{float(x['qat_uniform']):.2f}; {_diff(x, 'greedy', 'qat_')}; {_diff(x, 'search', 'qat_')}"
               + (f" (seed {x['qat_seed']} of {x['qat_seeds']})" if x.get("qat_seeds", 1) > 1 else "")
               if x.get("qat_uniform") is not None else "not run")
        out.append(f"| {x['model']} | {x['bits']} / {x['nl_bits']} | {_num(x['float'], '{:.2f}')} "
                   f"| {x['uniform']} {_num(x['top1_uniform'], '{:.2f}')} "
                   f"| {_pick(x, 'greedy')} | {_pick(x, 'search')} "
                   f"| {_diff(x, 'paper_rule') or 'not run yet'} | {qat} | {x.get('search_dominates') or ''} | {x['cells']} "
                   f"| **{x['verdict']}** |")
    return "\n".join(out) + "\n"


def write_summary(spec, stats: list[dict], rows: list[dict]) -> Path | None:
    planned = {setting: len(cells) for setting, cells in ptq_cells_by_setting(spec).items()}
    lines = summary_rows(stats, rows, planned)
    if not lines:
        return None
    path = Path(spec.results_dir) / f"{spec.name}_summary.csv"
    atomic_write_text(path, csv_text(SUMMARY_FIELDS, lines))
    atomic_write_text(path.with_suffix(".md"), markdown(lines, spec.name))
    return path
