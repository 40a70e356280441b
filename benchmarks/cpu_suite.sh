#!/usr/bin/env bash
# The CPU measurements of BENCHMARKS.md, in order, on the embedded default model (2-core CPU, ~1.5 h).
# Run after `make setup` on an otherwise idle machine. Every step logs to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
out=benchmarks/results
mkdir -p "$out"
step=${1:-all}

if [[ $step == all || $step == make-run ]]; then  # 1. the README's first command, after set-up
  # once with the fast kernels' numba cache cleared (a fresh clone compiles them), once warm
  find mnq_search -name "*.nbi" -delete -o -name "*.nbc" -delete
  rm -rf runs/default
  /usr/bin/time -f "%e" -o "$out/make_run_seconds_cold.txt" make run > "$out/make_run_cold.log" 2>&1
  rm -rf runs/default
  /usr/bin/time -f "%e" -o "$out/make_run_seconds.txt" make run > "$out/make_run.log" 2>&1
  cp runs/default/result.json "$out/make_run_result.json"
fi

if [[ $step == all || $step == methods ]]; then  # every method against its float op; profile of one batch
  python benchmarks/bench_methods.py
  python benchmarks/profile_eval.py --json "$out/profile_eval_after.json" | tee "$out/profile_eval_after.md"
fi

if [[ $step == all || $step == study ]]; then  # 2. the paper's tables in miniature (PTQ + a mini QAT epoch)
  mnq-search study run studies/paper_tables_cpu_mini.toml --quiet
fi

if [[ $step == all || $step == qat-speed ]]; then  # 3. QAT / eval speed ratios (CPU miniature)
  rm -f "$out/qat_speed_cpu.jsonl"
  for a in uniform:ivit uniform:ibert uniform:fqvit; do
    python benchmarks/bench_qat.py --batch 64 --assignment "$a" --repeats 10 --out "$out/qat_speed_cpu.jsonl"
  done
fi

if [[ $step == all || $step == search ]]; then  # 4. joint search vs the greedy rule, 6 bits, same QAT after
  rm -rf runs/search6-optuna runs/search6-sqnr_diff
  /usr/bin/time -f "%e" -o "$out/search6_optuna_seconds.txt" \
    mnq-search run --strategy optuna --objective qat --bits 6 --n-trials 12 --qat-steps 10 --qat-holdout 500 \
      --seed 0 --out runs/search6-optuna --quiet
  mnq-search run --strategy sqnr_diff --bits 6 --seed 0 --out runs/search6-sqnr_diff --quiet
  for s in optuna sqnr_diff; do
    mnq-search qat --assignment runs/search6-$s/assignment.json --steps 30 --qat-batch-size 64 --seed 0 \
      --out runs/search6-$s/qat --quiet
  done
  python - <<'PY'
import csv, json
rows = []
for s in ("optuna", "sqnr_diff"):
    run = json.load(open(f"runs/search6-{s}/result.json"))
    qat = json.load(open(f"runs/search6-{s}/qat/result.json"))
    rows.append({"strategy": s, "bits": 6, "top1_fp": run["top1_fp"], "top1_ptq": run["top1_quant"],
                 "top1_after_qat": qat["top1_qat"], "qat_steps_after": 30,
                 "search_trials": json.dumps((run.get("search") or {}).get("trials", "")),
                 "search_best": json.dumps((run.get("search") or {}).get("best", "")),
                 "search_seconds": open("benchmarks/results/search6_optuna_seconds.txt").read().strip() if s == "optuna" else "",
                 "counts": json.dumps(run["counts"])})
with open("studies/results/search6-optuna-vs-sqnr_diff-cpu.csv", "w", newline="") as fh:
    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
print(open("studies/results/search6-optuna-vs-sqnr_diff-cpu.csv").read())
PY
fi

if [[ $step == all || $step == figure ]]; then  # 5. the README's figure
  mnq-search report runs/default --out docs/report-default --quiet
fi
