"""Choosing the default weights of the ``unified`` strategy on validation data (issue 13).

For each non-linear bit-width of ``--nl-bits`` on the embedded default (linear layers at 8 bits,
every registered family offered), one ``unified`` run records every slot's terms (output ASQNR,
single-switch validation KL on the first ``--val-size`` validation images, cost). Every weight
triple on a simplex grid of step ``--step`` is then replayed (:func:`strategies.unified.choose`, no
new sensitivity pass) and its assignment scored by the validation KL on *other* validation images
(the next ``--heldout`` ones: the P term was measured on the first ones, so scoring the weights on
them would favour it). Writes ``studies/results/unified_weights.csv`` (one row per setting and
weight triple, with the best uniform assignment's held-out KL for reference) and prints, per weight
triple, the mean over settings of its KL relative to the best uniform's; the lowest is the default.

Usage: python benchmarks/unified_weights.py [--nl-bits 8,6,4] [--step 0.1]
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as _dt
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mnq_search  # noqa: E402,F401  (its OpenMP setting, before torch)


def grid(step: float) -> list[tuple[float, float, float]]:
    n = round(1 / step)
    return [(a / n, p / n, (n - a - p) / n) for a in range(n + 1) for p in range(n + 1 - a)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nl-bits", default="8,6,4")
    ap.add_argument("--step", type=float, default=0.1)
    ap.add_argument("--val-size", type=int, default=1000)
    ap.add_argument("--heldout", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "studies" / "results" / "unified_weights.csv"))
    args = ap.parse_args()
    try:
        nl_bits = [int(b) for b in args.nl_bits.split(",")]
    except ValueError:
        ap.error(f"--nl-bits {args.nl_bits}: give comma-separated integers, e.g. 8,6,4")
    if not 0 < args.step <= 0.5 or abs(round(1 / args.step) * args.step - 1) > 1e-9:
        ap.error("--step must divide 1, e.g. 0.1 or 0.25")

    from tqdm.auto import tqdm

    from mnq_search.context import RunSettings
    from mnq_search.incremental import IncrementalEvaluator
    from mnq_search.methods import uniform_assignment
    from mnq_search.pipeline import open_run
    from mnq_search.sensitivity import sensitivity_table
    from strategies import get_strategy
    from strategies.unified import choose

    rows = []
    weights = grid(args.step)
    for nl in nl_bits:
        settings = RunSettings(strategy="unified", bits=8, nl_bits=nl, val_size=args.val_size, progress=False,
                               device="cpu")
        ctx = open_run(settings, validation=args.val_size + args.heldout)
        ctx.sensitivity, _ = sensitivity_table(ctx)
        strategy = get_strategy("unified")
        strategy.run(ctx)
        info = strategy.info
        base = uniform_assignment(info["base"], ctx.slot_ops)
        calib = [x for x, _ in ctx.calib_batches()]
        val = [x for x, _ in ctx.validation_batches(args.val_size + args.heldout)]
        held = skip_images(val, args.val_size)
        ev = IncrementalEvaluator(copy.deepcopy(ctx.qmodel), ctx.model, calib, held, ctx.device)
        kl_base = ev.score(base)
        seen: dict[str, float] = {}
        for w in tqdm(weights, desc=f"nl {nl}: weights"):
            a = {**base, **choose(info["terms"], w)}
            key = repr(sorted(a.items()))
            if key not in seen:
                seen[key] = ev.score(a)
            changed = sum(a[s] != base[s] for s in base)
            cost = sum(info["terms"][s][a[s]]["cost"] for s in info["terms"])
            rows.append(dict(nl_bits=nl, w_sqnr=w[0], w_kl=w[1], w_cost=w[2], kl_heldout=seen[key],
                             kl_heldout_best_uniform=kl_base, best_uniform=info["base"], slots_changed=changed,
                             cost=cost, heldout_images=sum(len(x) for x in held)))
    out = Path(args.out)
    tmp = out.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)
    by_w: dict[tuple, list[float]] = {}
    for r in rows:
        by_w.setdefault((r["w_sqnr"], r["w_kl"], r["w_cost"]), []).append(r["kl_heldout"] / r["kl_heldout_best_uniform"])
    ranked = sorted(by_w.items(), key=lambda kv: sum(kv[1]) / len(kv[1]))
    print(f"<!-- {_dt.date.today()} · python benchmarks/unified_weights.py --nl-bits {args.nl_bits} --step {args.step} -->")
    print("| w_sqnr | w_kl | w_cost | " + " | ".join(f"KL / best uniform, nl {b}" for b in nl_bits) + " | mean |")
    print("|---:|---:|---:|" + "---:|" * (len(nl_bits) + 1))
    for w, ratios in ranked[:10] + [kv for kv in ranked[10:] if kv[0] in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))]:
        print(f"| {w[0]:.1f} | {w[1]:.1f} | {w[2]:.1f} | " + " | ".join(f"{r:.3f}" for r in ratios)
              + f" | {sum(ratios) / len(ratios):.3f} |")
    print(f"wrote {out}")


def skip_images(batches, skip: int):
    """The batches after the first ``skip`` images."""
    out, seen = [], 0
    for x in batches:
        n = len(x)
        if seen + n <= skip:
            seen += n
            continue
        out.append(x[max(0, skip - seen):])
        seen += n
    return out


if __name__ == "__main__":
    main()
