"""Instance-aware group quantization (IGQ-ViT) on the default model: per-tensor, static per-channel,
G = 8 groups everywhere and groups allocated at the BOPs of G = 8, each with the best uniform
non-linear method and with a searched mixed assignment; top-1 against the group count (issue 15).

Per bit-width b (linear weights and activations at b bits, the non-linear slots at b bits too):

1. the best uniform method: every family's ``uniform:<family>`` scored by the validation KL to the
   float logits (``--val-size`` validation images held out of the train split), per tensor;
2. the mixed assignment: the ``sequential`` strategy (validation KL), per tensor; both assignments are
   chosen once, per tensor, and kept for every quantizer setting;
3. each quantizer setting x assignment: calibration (128 train images), top-1 on *all* test images;
   ``alloc:8`` allocates the group counts on the validation images for that assignment;
4. with ``--joint-trials N``: the methods and the group counts searched jointly (``mnq-search run
   --strategy optuna --objective proxy --joint-groups --budget wBaBg8``: validation KL, every trial
   constrained to the BOPs of G = 8 everywhere), warm-started by the four assignments above (best
   uniform and sequential, per tensor and with allocated groups);
5. paired comparisons (bootstrap interval, exact McNemar, Holm across the table) against the
   per-tensor best-uniform cell of the same bit-width.

Selection on validation, report on the test set. Resumable: every finished cell is kept in
``--work`` (per-image correctness and its record; default ``studies/cells/group_quant``, kept in git so a
new machine resumes too) and skipped when the script runs again.
Writes studies/results/group_quant.csv, benchmarks/results/group_quant.md and
docs/report-default/group_quant.png.

Usage: python benchmarks/group_quant.py [--bits 4,6] [--val-size 1000] [--joint-trials 0] [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mnq_search import groups as G  # noqa: E402
from mnq_search.calibrate import calibrate, evaluate  # noqa: E402
from mnq_search.context import RunSettings  # noqa: E402
from mnq_search.incremental import evaluator_for, uniform_kls  # noqa: E402
from mnq_search.io import atomic_write_text  # noqa: E402
from mnq_search.methods import uniform_assignment  # noqa: E402
from mnq_search.pipeline._build import open_run  # noqa: E402
from mnq_search.plan import counts, save_assignment  # noqa: E402
from mnq_search.slot import groups_key  # noqa: E402
from mnq_search.stats import comparison_cells, comparison_columns, holm_adjust, paired_comparison  # noqa: E402
from strategies import get_strategy  # noqa: E402

SETTINGS = ("1", "channel", "8", "alloc:8")
SWEEP = ("2", "4", "16")  # extra uniform group counts for the best-uniform curve


def _label(setting: str) -> str:
    return {"1": "per-tensor", "channel": "per-channel static", "alloc:8": "IGQ allocated (BOPs of G=8)"}.get(
        setting, f"IGQ G={setting}")


class Bench:
    def __init__(self, bits: int, val_size: int, work: Path, progress: bool):
        self.bits = bits
        self.work = work / f"w{bits}a{bits}"
        self.work.mkdir(parents=True, exist_ok=True)
        self.ctx = open_run(RunSettings(bits=bits, nl_bits=bits, val_size=val_size, eval_size=None,
                                        progress=progress, out=str(self.work)), validation=val_size)
        self.progress = progress
        self.shapes = G.layer_shapes(self.ctx.qmodel, next(iter(self.ctx.calib_batches()))[0])
        self._ev = None

    @property
    def evaluator(self):
        if self._ev is None:
            self._ev = evaluator_for(self.ctx)
        return self._ev

    def cached(self, name: str, fn):
        path = self.work / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        value = fn()
        atomic_write_text(path, json.dumps(value, indent=1))
        return value

    def assignments(self) -> dict[str, dict]:
        def best_uniform():  # every family per tensor (groups at 1), as the other benchmarks choose it
            kls = uniform_kls(self.evaluator, self.ctx, groups={n: 1 for n in self.shapes})
            fam = min(kls, key=kls.get)
            return {"name": f"uniform:{fam}", "assignment": uniform_assignment(fam, self.ctx.slot_ops), "val_kl": kls}

        def mixed():
            t = time.perf_counter()
            G.set_groups(self.ctx.qmodel, {n: 1 for n in self.shapes})
            a = get_strategy("sequential").run(self.ctx).assignment
            return {"name": "sequential", "assignment": a, "seconds": time.perf_counter() - t}
        return {"uniform": self.cached("assign-uniform", best_uniform), "mixed": self.cached("assign-mixed", mixed)}

    def cell(self, which: str, assign: dict, setting: str) -> dict:
        name = f"cell-{which}-{setting.replace(':', '_')}"
        npz = self.work / f"{name}.npz"
        rec_path = self.work / f"{name}.json"
        if npz.is_file() and rec_path.is_file():
            rec = json.loads(rec_path.read_text())
            rec["correct"] = np.load(npz)["correct"]
            return rec
        qm = self.ctx.qmodel
        qm.set_assignment(assign["assignment"])
        parsed = G.parse_groups(setting)
        t = time.perf_counter()
        extra = {}
        if parsed.kind == "alloc":
            sens = G.group_sensitivity(self.evaluator, assign["assignment"], self.shapes, progress=self.progress)
            budget = G.total_cost(self.shapes, G.uniform_groups(qm, parsed.groups))
            alloc = G.allocate_groups(sens, self.shapes, budget)
            spec = alloc.groups
            extra = {"budget_bops": budget, "allocated": spec, "allocation_s": round(time.perf_counter() - t, 1)}
        else:
            spec = G.uniform_groups(qm, parsed)
        G.set_groups(qm, spec)
        calibrate(qm, self.ctx.calib_batches(), self.ctx.device)
        res = evaluate(qm, self.ctx.data.eval_batches(None, self.ctx.settings.batch_size), self.ctx.device,
                       self.progress, f"{which} {setting}", keep_correct=True)
        rec = {"bits": self.bits, "assignment": assign["name"], "which": which, "groups": setting,
               "label": _label(setting), "top1": res["top1"], "images": res["images"],
               "eval_s": round(res["seconds"], 1), "bops_per_image": G.total_cost(self.shapes, spec),
               "per_tensor_bops_per_image": G.total_cost(self.shapes, {}),
               "group_counts": {str(k): v for k, v in sorted(_hist(spec).items(), key=lambda kv: str(kv[0]))},
               "counts": counts(assign["assignment"], self.ctx.slot_ops), **extra}
        correct = res["correct"].numpy()
        tmp = npz.with_suffix(".tmp.npz")
        np.savez_compressed(tmp, correct=correct)
        tmp.replace(npz)
        atomic_write_text(rec_path, json.dumps(rec, indent=1))
        rec["correct"] = correct
        return rec

    def joint(self, assigns: dict, cells: list[dict], trials: int) -> dict:
        """Methods and group counts searched jointly by Optuna under the BOPs of G = 8 (validation KL),
        warm-started by the cells' assignments; one ``run`` under ``work/joint-N``."""
        from mnq_search.pipeline import run
        from mnq_search.search import SearchOptions
        from mnq_search.stats import unpack

        out = self.work / f"joint-{trials}"
        if not (out / "result.json").is_file():
            starts = []
            for c in cells:  # per tensor and allocated, of both assignments
                if c["groups"] not in ("1", "alloc:8"):
                    continue
                spec = c.get("allocated") or {n: 1 for n in self.shapes}
                path = self.work / f"warm-{c['which']}-{c['groups'].replace(':', '_')}.json"
                save_assignment(path, {**assigns[c["which"]]["assignment"],
                                       **{groups_key(n): g for n, g in spec.items()}}, bits=self.bits)
                starts.append(str(path))
            opts = SearchOptions(objectives=("proxy",), sampler="tpe", n_trials=trials, warm_start=tuple(starts))
            run(RunSettings(strategy="optuna", bits=self.bits, nl_bits=self.bits, val_size=self.ctx.settings.val_size,
                            eval_size=None, record_images=True, progress=self.progress, out=str(out), search=opts,
                            joint_groups=True, budget=f"w{self.bits}a{self.bits}g8"))
        res = json.loads((out / "result.json").read_text())
        data = np.load(out / "correct.npz")
        spec = res["groups"]["layers"]
        return {"bits": self.bits, "assignment": f"optuna ({trials} trials)", "which": "joint", "groups": "searched",
                "label": "methods x groups searched (BOPs of G=8)", "top1": res["top1_quant"],
                "images": res["eval_images"], "bops_per_image": G.total_cost(self.shapes, spec),
                "per_tensor_bops_per_image": G.total_cost(self.shapes, {}),
                "group_counts": {str(k): v for k, v in sorted(_hist(spec).items(), key=lambda kv: str(kv[0]))},
                "counts": res["counts"], "best_trial": res["search"]["best"],
                "correct": unpack(data["test"], int(data["n"]))}

    def float_top1(self) -> float:
        def fp():
            return evaluate(self.ctx.model, self.ctx.data.eval_batches(None, self.ctx.settings.batch_size),
                            self.ctx.device, self.progress, "float")["top1"]
        return self.cached("float", fp)


def _hist(spec: dict) -> dict:
    out: dict = {}
    for v in spec.values():
        out[v] = out.get(v, 0) + 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", default="4,6")
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--work", default=str(ROOT / "studies" / "cells" / "group_quant"))
    ap.add_argument("--joint-trials", type=int, default=0,
                    help="trials of the joint methods x groups Optuna search per bit-width (default: 0, skipped)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    try:
        bits = [int(b) for b in args.bits.split(",")]
    except ValueError:
        ap.error(f"--bits {args.bits}: give comma-separated integers, e.g. 4,6")
    rows = []
    curves = {}
    fps = {}
    for b in bits:
        bench = Bench(b, args.val_size, Path(args.work), not args.quiet)
        fps[b] = bench.float_top1()
        assigns = bench.assignments()
        cells = [bench.cell(which, assigns[which], s) for which in ("uniform", "mixed") for s in SETTINGS]
        sweep = [bench.cell("uniform", assigns["uniform"], s) for s in SWEEP]
        if args.joint_trials > 0:
            cells.append(bench.joint(assigns, cells, args.joint_trials))
        base = cells[0]
        for c in cells[1:]:
            c["cmp"] = paired_comparison(c["correct"], base["correct"])
        curves[b] = sorted([(1, base["top1"])] + [(int(c["groups"]), c["top1"]) for c in cells + sweep
                                                   if c["which"] == "uniform" and c["groups"].isdigit()
                                                   and c["groups"] != "1"])
        rows += cells
        print(f"W{b}A{b}: " + ", ".join(f"{c['which']} {c['groups']} {c['top1']:.2f}" for c in cells + sweep), flush=True)
    holm_adjust([r["cmp"] for r in rows if "cmp" in r])
    _write(rows, curves, fps, args)


def _write(rows, curves, fps, args) -> None:
    import csv
    import io

    fields = ["bits", "assignment", "groups", "label", "top1", "images", "bops_per_image", "bops_vs_per_tensor",
              "diff_vs_per_tensor_uniform", "lo", "hi", "p_mcnemar", "p_holm", "group_counts", "counts"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields)
    w.writeheader()
    for r in rows:
        c = r.get("cmp", {})
        w.writerow({"bits": r["bits"], "assignment": r["assignment"], "groups": r["groups"], "label": r["label"],
                    "top1": f"{r['top1']:.2f}", "images": r["images"], "bops_per_image": r["bops_per_image"],
                    "bops_vs_per_tensor": f"{r['bops_per_image'] / r['per_tensor_bops_per_image']:.3f}",
                    **comparison_columns(c, "diff_vs_per_tensor_uniform"),
                    "group_counts": json.dumps(r["group_counts"]), "counts": json.dumps(r["counts"])})
    atomic_write_text(ROOT / "studies" / "results" / "group_quant.csv", buf.getvalue())
    lines = [f"<!-- {_dt.date.today()} · {platform.processor() or platform.machine()} · torch {torch.__version__} · "
             f"python benchmarks/group_quant.py --bits {args.bits} --val-size {args.val_size}"
             f"{f' --joint-trials {args.joint_trials}' if args.joint_trials else ''} -->", "",
             "Default model (fmnist-deit-tiny), linear and non-linear at the same bits; assignments chosen on "
             f"{args.val_size} validation images (per tensor), top-1 on all 10,000 test images; differences in points "
             "against the per-tensor cell with the best uniform method of the same bit-width (95 % paired bootstrap, "
             "exact McNemar, Holm across the table). BOPs per image of the group layers (block linears and "
             "attention products), relative to per tensor.", "",
             "| bits | assignment | input quantizers | top-1 % | BOPs × | Δ vs per-tensor uniform [95 % CI] | p (Holm) |",
             "|---|---|---|---:|---:|---|---:|"]
    for r in rows:
        d, p = comparison_cells(r.get("cmp"))
        lines.append(f"| W{r['bits']}A{r['bits']} | {r['assignment']} | {r['label']} | {r['top1']:.2f} | "
                     f"{r['bops_per_image'] / r['per_tensor_bops_per_image']:.2f} | {d} | {p} |")
    lines += ["", "Top-1 of the best uniform method against uniform group counts: " + "; ".join(
        f"W{b}A{b} (float {fps[b]:.2f}): " + ", ".join(f"G={g} {t:.2f}" for g, t in curve) for b, curve in curves.items())]
    text = "\n".join(lines) + "\n"
    print(text)
    atomic_write_text(ROOT / "benchmarks" / "results" / "group_quant.md", text)
    _plot(curves, fps)


def _plot(curves, fps) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for b, curve in curves.items():
        g, t = zip(*curve)
        line, = ax.plot(g, t, marker="o", label=f"W{b}A{b}")
        ax.axhline(fps[b], color=line.get_color(), ls=":", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("groups per layer (G)")
    ax.set_ylabel("top-1 % (10,000 test images)")
    ax.set_title("IGQ-ViT groups, best uniform method (dotted: float)")
    ax.legend()
    fig.tight_layout()
    out = ROOT / "docs" / "report-default" / "group_quant.png"
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(out)


if __name__ == "__main__":
    main()
