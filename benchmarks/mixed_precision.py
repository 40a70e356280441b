"""Bit-widths per layer under a BOP budget (Mix-QViT) against uniform precision at the same budget, on
the default model and all test images (issue 14).

For each budget wBaB (the BOPs of every weight layer at b-bit weights and activations) the
non-linear slots run at b bits in every cell, so only the linear layers' precision differs:

- ``uniform``: every layer at b bits, the family with the lowest validation KL (``uniform:<family>``
  over the registered families);
- ``mixqvit``: the model at b bits (so the quantizers that no budget counts, the q/k/v operands of
  the attention products, stay at b bits as in the uniform row), per-layer bits from ``--search-bits``
  (default {4, 5, 6, 8}, plus one bit below the budget's when the set has nothing below it: {3, 4, 5,
  6, 8} at W4A4, where {4, 5, 6, 8} admits only the all-4 point) allocated by the sensitivity ILP under the budget (sensitivities relative to b bits), then the
  best uniform family on the allocated model;
- ``mixqvit:sequential``: the same allocation, then the ``sequential`` method search;
- with ``--importances none,lrp,hessian``, the ``mixqvit`` row once per layer importance (the
  sensitivity table measured once per budget and shared through ``--bit-sensitivity-cache``; an
  existing ``none`` cell seeds it), each against the same uniform row;
- with ``--post-ln``, also the uniform row with clipped channel-wise post-LayerNorm inputs folded
  into the LayerNorm and the next linear (``--post-ln channel``, :mod:`mnq_search.reparam`); same cost;
- with ``--joint-trials N``, the joint Optuna search over bits x methods (``mnq-search run --strategy
  optuna --objective proxy,bops --sampler nsga2 --joint-bits --budget wBaB``): N trials of NSGA-II on
  validation KL and BOPs, the budget a constraint on every trial, warm-started by the budget's
  allocated rows and the uniform row; the row is the front's best trial within the budget, and the
  whole front goes to its cell's ``pareto.json``.

Selection on ``--val-size`` validation images; top-1 on all 10,000 test images; each cell against the
uniform cell of its budget (95 % paired bootstrap, exact McNemar, Holm across the table). Every
cell is one ``mnq-search run`` (result.json, correct.npz) under ``--work`` (default
``studies/cells/mixed_precision``, kept in git so a new machine resumes too); finished cells are kept
and skipped when the script runs again. Writes studies/results/mixed_precision.csv,
benchmarks/results/mixed_precision.md and docs/report-default/mixed_precision_pareto.png (top-1 against
BOPs and weight storage, and the joint searches' fronts).

Usage: python benchmarks/mixed_precision.py [--budgets 6,4] [--val-size 1000] [--strategies mixqvit]
    [--joint-trials N] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import io
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mnq_search.context import RunSettings  # noqa: E402
from mnq_search.incremental import evaluator_for, uniform_kls  # noqa: E402
from mnq_search.io import atomic_write_text  # noqa: E402
from mnq_search.pipeline import run  # noqa: E402
from mnq_search.pipeline._build import open_run  # noqa: E402
from mnq_search.stats import comparison_cells, comparison_columns, holm_adjust, paired_comparison, unpack  # noqa: E402


def best_uniform_family(bits: int, val_size: int, work: Path) -> str:
    """The family with the lowest validation KL at ``bits`` (cached in ``work``)."""
    path = work / f"best-uniform-w{bits}.json"
    if path.is_file():
        return json.loads(path.read_text())["family"]
    ctx = open_run(RunSettings(bits=bits, val_size=val_size, progress=False), validation=val_size)
    kls = uniform_kls(evaluator_for(ctx), ctx)
    family = min(kls, key=kls.get)
    atomic_write_text(path, json.dumps({"family": family, "val_kl": kls}, indent=1))
    return family


def candidate_bits(base: list[int], budget_bits: int) -> list[int]:
    """The per-layer candidates at a uniform budget: ``base``, plus one bit below the budget when ``base``
    has nothing below it (at the W4A4 budget, candidates {4, 5, 6, 8} leave only the all-4 point)."""
    below = budget_bits - 1
    return sorted(set(base) | ({below} if below >= 2 and below < min(base) else set()))


def seed_cache(cache: Path, none_cell: Path, common: dict, bits: int, search_bits: tuple) -> None:
    """Write the bit-sensitivity cache of a budget from its finished ``none`` cell (the same table the
    lrp and hessian cells would measure again), keyed as mixqvit keys it."""
    from strategies.mixqvit import sensitivity_key

    if cache.is_file() or not (none_cell / "search.json").is_file():
        return
    s = json.loads((none_cell / "search.json").read_text())
    family = s.get("sensitivity_family") or best_uniform_family(bits, common["val_size"], cache.parent)
    ctx = open_run(RunSettings(strategy="mixqvit", bits=bits, budget=f"w{bits}a{bits}", search_bits=search_bits,
                               progress=False, **common))
    atomic_write_text(cache, json.dumps({"key": sensitivity_key(ctx, family), "kl0": s["kl_baseline_bits"],
                                         "sensitivity": s["sensitivity"]}))


def cell(work: Path, name: str, progress: bool, **settings) -> dict:
    out = work / name
    if not (out / "result.json").is_file():
        run(RunSettings(eval_size=None, record_images=True, progress=progress, out=str(out), **settings))
    rec = json.loads((out / "result.json").read_text())
    data = np.load(out / "correct.npz")
    rec["correct"] = unpack(data["test"], int(data["n"]))
    return rec


def joint_cell(work: Path, b: int, fam: str, cands: list[int], tag: str, trials: int, progress: bool, **common) -> dict:
    """The joint bits x methods NSGA-II search under the budget wBaB, warm-started by the budget's
    finished allocated cells (their assignment files) and the uniform row's family."""
    from mnq_search.search import SearchOptions

    starts = tuple(str(p) for p in sorted(work.glob(f"w{b}a{b}-mixqvit*-{tag}/assignment.json"))) + (f"uniform:{fam}",)
    opts = SearchOptions(objectives=("proxy", "bops"), sampler="nsga2", n_trials=trials, warm_start=starts)
    c = cell(work, f"w{b}a{b}-optuna-joint-{tag}-n{trials}", progress, strategy="optuna", bits=b, budget=f"w{b}a{b}",
             search_bits=tuple((x, x) for x in cands), joint_bits=True, search=opts, **common)
    c["label"], c["budget"], c["candidates"] = f"optuna joint (NSGA-II, {trials} trials)", f"w{b}a{b}", ",".join(map(str, cands))
    layers = c.get("layer_bits", {}).get("layers", {})
    c["search"] = {**c.get("search", {}), "methods": {"strategy": "searched per slot"},
                   "bits": {"layers": layers, "bops_per_image": c["layer_bits"]["bops_per_image"]},
                   "budget_bops": c["search"]["budget_gbops"] * 1e9}
    return c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="6,4")
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--work", default=str(ROOT / "studies" / "cells" / "mixed_precision"))
    ap.add_argument("--strategies", default="mixqvit,mixqvit:sequential",
                    help="the allocated rows (default: mixqvit,mixqvit:sequential)")
    ap.add_argument("--search-bits", default="4,5,6,8",
                    help="candidate bit-widths per layer; one below the budget's is added when the set has none "
                         "(default: 4,5,6,8)")
    ap.add_argument("--post-ln", action="store_true",
                    help="also the uniform row with clipped channel-wise post-LayerNorm inputs (--post-ln channel)")
    ap.add_argument("--importances", default="none",
                    help="layer importances of the mixqvit row: none, lrp, hessian, comma-separated (default: none)")
    ap.add_argument("--joint-trials", type=int, default=0,
                    help="trials of the joint bits x methods NSGA-II search per budget (default: 0, skipped)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.joint_trials < 0:
        ap.error(f"--joint-trials {args.joint_trials}: give a number of trials >= 0")
    try:
        base_bits = sorted({int(b) for b in args.search_bits.split(",")})
    except ValueError:
        ap.error(f"--search-bits {args.search_bits}: give comma-separated bit-widths, e.g. 4,5,6,8")
    try:
        budgets = [int(b) for b in args.budgets.split(",")]
    except ValueError:
        ap.error(f"--budgets {args.budgets}: give comma-separated bit-widths, e.g. 6,4")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for b in budgets:
        fam = best_uniform_family(b, args.val_size, work)
        common = dict(nl_bits=b, val_size=args.val_size)
        base = cell(work, f"w{b}a{b}-uniform", not args.quiet, strategy=f"uniform:{fam}", bits=b, **common)
        base["label"], base["budget"] = f"uniform:{fam}", f"w{b}a{b}"
        rows.append(base)
        if args.post_ln:  # clipped channel-wise post-LayerNorm inputs (reparameterised), same family and bits
            c = cell(work, f"w{b}a{b}-uniform-postln", not args.quiet, strategy=f"uniform:{fam}", bits=b,
                     post_ln="channel", **common)
            c["label"], c["budget"] = f"uniform:{fam} + post-LN channel", f"w{b}a{b}"
            c["cmp"] = paired_comparison(c["correct"], base["correct"])
            rows.append(c)
        cands = candidate_bits(base_bits, b)
        tag = "b" + "".join(map(str, cands))
        search_bits = tuple((x, x) for x in cands)
        cache = work / f"bit-sensitivity-w{b}a{b}-{tag}.json"
        for strategy in args.strategies.split(","):
            for imp in ([i for i in args.importances.split(",")] if strategy == "mixqvit" else ["none"]):
                name = f"w{b}a{b}-{strategy.replace(':', '-')}{'' if imp == 'none' else '-' + imp}-{tag}"
                if imp != "none":
                    seed_cache(cache, work / f"w{b}a{b}-mixqvit-{tag}", common, b, search_bits)
                c = cell(work, name, not args.quiet, strategy=strategy, bits=b, budget=f"w{b}a{b}",
                         search_bits=search_bits, importance=imp,
                         bit_sensitivity_cache=str(cache) if imp != "none" else None, **common)
                c["label"] = strategy if imp == "none" else f"{strategy} (importance {imp})"
                c["budget"], c["candidates"] = f"w{b}a{b}", ",".join(map(str, cands))
                c["cmp"] = paired_comparison(c["correct"], base["correct"])
                rows.append(c)
        if args.joint_trials:
            c = joint_cell(work, b, fam, cands, tag, args.joint_trials, not args.quiet, **common)
            c["cmp"] = paired_comparison(c["correct"], base["correct"])
            rows.append(c)
        print(", ".join(f"{r['label']} {r['top1_quant']:.2f}" for r in rows if r["budget"] == f"w{b}a{b}"), flush=True)
    holm_adjust([r["cmp"] for r in rows if "cmp" in r])
    _write(rows, args)
    print(f"plot: {_plot(rows, work)}")


def _plot(rows: list[dict], work: Path) -> Path:
    """Top-1 on the test set against BOPs and against weight storage (every row, uniform points as
    squares), and each joint search's front on validation (KL vs BOPs, budget dashed):
    docs/report-default/mixed_precision_pareto.png."""
    from mnq_search.mixprec import layer_macs, layer_params, total_bops, weight_bytes
    from mnq_search.report._style import new_figure, save_png
    from mnq_search.zoo import create_zoo_model

    model = create_zoo_model("fmnist-deit-tiny")
    macs, params = layer_macs(model), layer_params(model)
    fig = new_figure(13, 3.8)
    ax_bops, ax_size, ax_front = fig.subplots(1, 3)
    style = {"uniform": ("s", "black"), "mixqvit": ("o", "tab:blue"), "mixqvit:sequential": ("D", "tab:green"),
             "optuna": ("*", "tab:red")}
    seen = set()
    for r in rows:
        b = int(r["budget"][1:].split("a")[0])
        layers = (r.get("layer_bits") or {}).get("layers")
        bits = {n: tuple(v) for n, v in layers.items()} if layers else {n: (b, b) for n in macs}
        kind = ("uniform" if r["label"].startswith("uniform") else "optuna" if r["label"].startswith("optuna")
                else r["label"].split(" ")[0])
        marker, color = style.get(kind, ("o", "tab:gray"))
        label = None if kind in seen else kind
        seen.add(kind)
        x_bops, x_size = total_bops(macs, bits) / 1e9, weight_bytes(params, bits) / 1e6
        for ax, x in ((ax_bops, x_bops), (ax_size, x_size)):
            ax.plot([x], [r["top1_quant"]], marker, color=color, label=label, markersize=7 if kind == "optuna" else 5,
                    fillstyle="none" if "post-LN" in r["label"] else "full")
    for ax, xlabel in ((ax_bops, "GBOPs per image (weight layers)"), (ax_size, "weight storage (MB)")):
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("top-1 % (all 10,000 test images)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    ax_bops.legend(fontsize=7, loc="best")
    ax_bops.set_title("accuracy x BOPs (hollow: + post-LN channel)", fontsize=9)
    ax_size.set_title("accuracy x weight storage", fontsize=9)
    for path in sorted(work.glob("w*a*-optuna-joint-*/pareto.json")):
        front = json.loads(path.read_text())["front"]
        b = int(path.parent.name[1:].split("a")[0])
        pts = sorted((p["values"]["gbops"], p["values"]["kl"]) for p in front)
        line, = ax_front.plot([x for x, _ in pts], [y for _, y in pts], ".-", label=f"front, budget w{b}a{b}")
        ax_front.axvline(total_bops(macs, default=(b, b)) / 1e9, color=line.get_color(), ls="--", lw=0.8)
    ax_front.set_xlabel("GBOPs per image", fontsize=8)
    ax_front.set_ylabel("validation KL to the float logits", fontsize=8)
    ax_front.set_yscale("log")
    ax_front.set_title("joint NSGA-II fronts (validation; dashed: budgets)", fontsize=9)
    ax_front.grid(alpha=0.3)
    ax_front.tick_params(labelsize=7)
    if ax_front.lines:
        ax_front.legend(fontsize=7)
    return save_png(fig, ROOT / "docs" / "report-default" / "mixed_precision_pareto.png")


def _write(rows, args) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["budget", "strategy", "candidates", "methods", "top1", "top1_val", "images", "budget_bops",
                                        "bops_per_image", "bits_histogram", "diff_vs_uniform", "lo", "hi", "p_mcnemar",
                                        "p_holm"])
    w.writeheader()
    lines = [f"<!-- {_dt.date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
             f"python benchmarks/mixed_precision.py --budgets {args.budgets} --search-bits {args.search_bits} "
             f"{'--post-ln ' if args.post_ln else ''}"
             f"{f'--importances {args.importances} ' if args.importances != 'none' else ''}"
             f"--val-size {args.val_size} -->", "",
             "Default model (fmnist-deit-tiny), non-linear slots at the budget's bits in every row; selection on "
             f"{args.val_size} validation images, top-1 on all 10,000 test images; Δ against the uniform row of the "
             "same budget (95 % paired bootstrap, exact McNemar, Holm across the table).", "",
             "| budget | strategy | candidate bits | methods | top-1 % | bits per layer (count) | BOPs / budget | Δ vs uniform [95 % CI] | p (Holm) |",
             "|---|---|---|---|---:|---|---:|---|---:|"]
    for r in rows:
        s = r.get("search") or {}
        c = r.get("cmp")
        hist = {}
        if "bits" in s:
            for pair in s["bits"]["layers"].values():
                hist[f"w{pair[0]}a{pair[1]}"] = hist.get(f"w{pair[0]}a{pair[1]}", 0) + 1
            bops, budget = s["bits"]["bops_per_image"], s["budget_bops"]
            ratio = f"{bops / budget:.3f}"
        else:
            hist = {r["budget"]: "all"}
            bops = budget = ""
            ratio = "1.000"
        methods = (s.get("methods") or {}).get("strategy", r["label"])
        w.writerow({"budget": r["budget"], "strategy": r["label"], "candidates": r.get("candidates", ""),
                    "methods": methods, "top1": f"{r['top1_quant']:.2f}",
                    "top1_val": r.get("top1_val", ""), "images": r["eval_images"], "budget_bops": budget,
                    "bops_per_image": bops, "bits_histogram": json.dumps(hist),
                    **comparison_columns(c, "diff_vs_uniform")})
        d, p = comparison_cells(c)
        bits_text = ", ".join(f"{k}: {v}" for k, v in sorted(hist.items()))
        lines.append(f"| {r['budget']} | {r['label']} | {r.get('candidates', '')} | {methods} | {r['top1_quant']:.2f} | {bits_text} | {ratio} | "
                     f"{d} | {p} |")
    atomic_write_text(ROOT / "studies" / "results" / "mixed_precision.csv", buf.getvalue())
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(ROOT / "benchmarks" / "results" / "mixed_precision.md", text)


if __name__ == "__main__":
    main()
