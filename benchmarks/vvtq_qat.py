"""Variation-aware QAT (VVTQ) ablation at low bits on the default model (issue 16).

Cells, each one ``mnq-search qat`` run from the same calibrated PTQ model, same data order, epochs
and seed (the assignment: ``--assignment``, by default the best uniform assignment at the bits):

- ``plain``: task loss (cross-entropy) only; the oscillations are tracked (``--qat-recipe vvtq`` at
  strength 0 adds no term, so the training is the plain one);
- ``+multicrop``: multi-crop distillation from K cached teacher crops per image instead of the task loss;
- ``+lsq``: and learnable weight steps per head (qkv) and per channel (module-dependent);
- ``full``: and the variation-aware regulariser on VVTQ's schedule (strength ``--strength``).

The training set is a fixed ``--train-images`` subset of the train split (the rest held out, the
validation split included), so that a CPU can afford the four runs; top-1 on all 10,000 test images,
paired against ``plain`` (bootstrap interval, exact McNemar, Holm across the table). Resumable: a
finished cell (its result.json) is skipped.

The setting: ``--bits`` (the model's, 4..8), ``--nl-bits`` (the non-linear slots', default ``--bits``)
and ``--layer-bits`` (every weight layer at that width, 2..8, for W3A3 and below, where the model-wide
``--bits`` stops). Without ``--assignment`` the cells train the best uniform family at the setting,
chosen by validation KL to the float logits (written to the work folder as ``assignment.json``).

Writes studies/results/vvtq_qat{TAG}.csv, benchmarks/results/vvtq_qat{TAG}.md and
docs/report-default/vvtq_oscillation{TAG}.png, where TAG is empty for W4A4 with non-linear 4 bits and
``_w{L}a{L}_nl{N}`` otherwise.

Usage: python benchmarks/vvtq_qat.py [--assignment A.json] [--bits 4] [--nl-bits 6] [--layer-bits 3]
       [--epochs 3] [--train-images 6400]
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
from mnq_search.io import atomic_write_text  # noqa: E402
from mnq_search.pipeline._qat import qat_job  # noqa: E402
from mnq_search.qat import QATConfig  # noqa: E402
from mnq_search.stats import comparison_cells, comparison_columns, holm_adjust, paired_comparison, unpack  # noqa: E402

TRAIN_TOTAL = 60_000


def cells(args) -> dict[str, dict]:
    mc = dict(multicrop=args.crops, multicrop_cache=str(Path(args.work) / "soft_labels.pt"))
    return {
        "plain": dict(recipe="vvtq", vvtq_strength=0.0),
        "+multicrop": dict(recipe="vvtq", vvtq_strength=0.0, **mc),
        "+lsq": dict(recipe="vvtq", vvtq_strength=0.0, vvtq_lsq=True, **mc),
        "full": dict(recipe="vvtq", vvtq_strength=args.strength, vvtq_lsq=True, **mc),
    }


def tag(args) -> str:
    """The output-name suffix of a setting: empty for the first one measured (W4A4, non-linear 4 bits)."""
    w, nl = args.weight_bits, args.slot_bits
    return "" if (w, nl) == (4, 4) else f"_w{w}a{w}_nl{nl}"


def setting_text(args) -> str:
    return f"W{args.weight_bits}A{args.weight_bits} (non-linear slots at {args.slot_bits} bits)"


def best_uniform_assignment(args, work: Path) -> str:
    """The best uniform family at the setting by validation KL (1,000 validation images), saved with
    the setting's layer bits as ``work/assignment.json``; returns its path."""
    path = work / "assignment.json"
    if path.is_file():
        return str(path)
    from mnq_search.incremental import evaluator_for, uniform_kls
    from mnq_search.methods import uniform_assignment
    from mnq_search.mixprec import layer_bits
    from mnq_search.pipeline._build import open_run
    from mnq_search.plan import save_assignment
    from mnq_search.slot import bits_key

    ctx = open_run(RunSettings(bits=args.bits, nl_bits=args.nl_bits, val_size=1000, progress=False), validation=1000)
    layers = list(layer_bits(ctx.qmodel)) if args.layer_bits else []
    kls = uniform_kls(evaluator_for(ctx), ctx, bits={layer: (args.layer_bits,) * 2 for layer in layers})
    family = min(kls, key=kls.get)
    extra = {bits_key(layer): args.layer_bits for layer in layers}
    save_assignment(path, {**uniform_assignment(family, ctx.slot_ops), **extra}, model=ctx.info.name,
                    bits=args.bits, nl_bits=args.slot_bits, fine_grid=False, strategy=f"uniform:{family}",
                    selection={"split": "validation (1000 images)", "val_kl": kls})
    return str(path)


def run_cell(name: str, changes: dict, args) -> dict:
    out = Path(args.work) / name.strip("+")
    if not (out / "result.json").is_file():
        qcfg = QATConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=0,
                         holdout=TRAIN_TOTAL - args.train_images, **changes)
        settings = RunSettings(bits=args.bits, nl_bits=args.nl_bits, eval_size=None, record_images=True, val_eval_size=1000,
                               progress=not args.quiet).validate()
        qat_job(args.assignment, settings, qcfg, out=str(out), bits_given=True)
    rec = json.loads((out / "result.json").read_text())
    data = np.load(out / "correct.npz")
    rec["correct"] = unpack(data["test"], int(data["n"]))
    rec["name"], rec["folder"] = name, out
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--assignment", help="the assignment file to train (default: the best uniform one at the setting)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--nl-bits", type=int, help="the non-linear slots' bit-width (default: --bits)")
    ap.add_argument("--layer-bits", type=int, help="every weight layer at this bit-width (2..8; e.g. 3 for W3A3)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-images", type=int, default=6400)
    ap.add_argument("--crops", type=int, default=4)
    ap.add_argument("--strength", type=float, default=0.01)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--work", help="the cells' folder (default: studies/cells/vvtq_qat/w{L}a{L}-nl{N})")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.assignment and not Path(args.assignment).is_file():
        ap.error(f"--assignment {args.assignment}: not found")
    if not 4 <= args.bits <= 8 or (args.nl_bits is not None and not 4 <= args.nl_bits <= 8):
        ap.error("--bits and --nl-bits must be in 4..8 (below 4 bits: --layer-bits)")
    if args.layer_bits is not None and not 2 <= args.layer_bits <= 8:
        ap.error("--layer-bits must be in 2..8")
    if args.layer_bits is not None and args.assignment:
        ap.error("--layer-bits builds the uniform assignment; an --assignment file carries its own layer_bits")
    if not 0 < args.train_images <= TRAIN_TOTAL - 5000:
        ap.error(f"--train-images must be in 1..{TRAIN_TOTAL - 5000} (the validation split stays out)")
    args.weight_bits, args.slot_bits = args.layer_bits or args.bits, args.nl_bits or args.bits  # the setting
    w = args.weight_bits
    args.work = args.work or str(ROOT / "studies" / "cells" / "vvtq_qat" / f"w{w}a{w}-nl{args.slot_bits}")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    args.assignment = args.assignment or best_uniform_assignment(args, Path(args.work))
    rows = [run_cell(n, c, args) for n, c in cells(args).items()]
    base = rows[0]
    for r in rows[1:]:
        r["cmp"] = paired_comparison(r["correct"], base["correct"])
    holm_adjust([r["cmp"] for r in rows[1:]])
    _write(rows, args)
    _plot(rows, args)


def _osc(rec: dict) -> list[tuple[int, float]]:
    return [(int(h["epoch"]), float(h["osc_rate"])) for h in rec["history"] if h.get("osc_rate") is not None]


def _write(rows, args) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["cell", "bits", "nl_bits", "weight_bits", "epochs", "train_images", "top1_ptq", "top1_qat", "top1_val",
                                        "osc_rate_last", "diff_vs_plain", "lo", "hi", "p_mcnemar", "p_holm",
                                        "qat_seconds"])
    w.writeheader()
    lines = [f"<!-- {_dt.date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
             f"python benchmarks/vvtq_qat.py --assignment {_rel(args.assignment)} --bits {args.bits}{_flags(args)} "
             f"--epochs {args.epochs} "
             f"--train-images {args.train_images} --crops {args.crops} --strength {args.strength} -->", "",
             f"Default model, {setting_text(args)}, `{_strategy(args)}`, QAT for {args.epochs} "
             f"epochs on {args.train_images} training images (lr {args.lr}, batch {args.batch_size}, seed 0), top-1 "
             "on all 10,000 test images; Δ against `plain` (95 % paired bootstrap, exact McNemar, Holm).", "",
             "| cell | PTQ top-1 % | QAT top-1 % | oscillation rate, last epoch | Δ vs plain [95 % CI] | p (Holm) | QAT s |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        c = r.get("cmp")
        osc = _osc(r)
        last = osc[-1][1] if osc else None
        w.writerow({"cell": r["name"], "bits": args.bits, "nl_bits": args.slot_bits,
                    "weight_bits": args.weight_bits, "epochs": args.epochs, "train_images": args.train_images,
                    "top1_ptq": r["top1_ptq"], "top1_qat": r["top1_qat"], "top1_val": r.get("top1_val", ""),
                    "osc_rate_last": "" if last is None else f"{last:.5f}",
                    **comparison_columns(c, "diff_vs_plain"), "qat_seconds": r["qat_seconds"]})
        d, p = comparison_cells(c)
        osc_text = "" if last is None else f"{last:.4f}"
        lines.append(f"| {r['name']} | {r['top1_ptq']:.2f} | {r['top1_qat']:.2f} | {osc_text} | {d} | {p} | "
                     f"{r['qat_seconds']:.0f} |")
    atomic_write_text(ROOT / "studies" / "results" / f"vvtq_qat{tag(args)}.csv", buf.getvalue())
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(ROOT / "benchmarks" / "results" / f"vvtq_qat{tag(args)}.md", text)


def _rel(path: str) -> str:
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


def _flags(args) -> str:
    return "".join(f" --{k.replace('_', '-')} {v}" for k, v in (("nl_bits", args.nl_bits), ("layer_bits", args.layer_bits))
                   if v is not None)


def _strategy(args) -> str:
    return json.loads(Path(args.assignment).read_text()).get("strategy") or Path(args.assignment).name


def _plot(rows, args) -> None:
    from matplotlib.ticker import MaxNLocator

    from mnq_search.report._style import new_figure, save_png

    fig = new_figure(6.0, 3.4)
    ax = fig.add_subplot()
    for r in rows:
        osc = _osc(r)
        if osc:
            ax.plot([e for e, _ in osc], [v for _, v in osc], marker="o", label=r["name"])
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("oscillation rate (weights that flipped)")
    ax.set_title(f"VVTQ ablation, {setting_text(args)}: weight oscillation per epoch", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    save_png(fig, ROOT / "docs" / "report-default" / f"vvtq_oscillation{tag(args)}.png")


if __name__ == "__main__":
    main()
