#!/usr/bin/env bash
# The GPU runs that issues 3-5 ask for and BENCHMARKS.md still owes ("Owed GPU runs"), in the order
# to run them on one lent H100/H200 (the `device` tool; 10 minutes per command, so one step per call).
# Not yet run on a GPU: no session so far was lent one.
#
# Here, before the first call (the GPU image has torch and timm but no optuna, rich or the data):
#   ../shared/scripts/gpu-wheels.sh rich markdown-it-py mdurl pygments
#   mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/* data/fashion-mnist/
#   (add /data/ to .git/info/exclude) and carry [".whl", "data"] with every call.
# Each call then starts with the install line that gpu-wheels.sh prints, and runs e.g.
#   MNQ_FMNIST_DIR=$PWD/data/fashion-mnist bash benchmarks/gpu_suite.sh pretrain
# with `cp -r runs/... studies/results benchmarks/results $OUT/` at the end to bring results back.
set -euo pipefail
cd "$(dirname "$0")/.."
cli="python3 -m mnq_search.cli"
out=benchmarks/results/gpu
mkdir -p "$out" studies/results
step=${1:-all}

if [[ $step == all || $step == pretrain ]]; then  # the zoo by its recipes (40 epochs; ~3 min each on an H100)
  for m in fmnist-deit-tiny fmnist-vit-small fmnist-swin-tiny; do
    $cli pretrain "$m" --device cuda --no-resume --out "runs/pretrain-$m" --quiet
    cp "runs/pretrain-$m/$m.safetensors" "runs/pretrain-$m/$m.json" mnq_search/weights/
  done
fi

if [[ $step == all || $step == speed ]]; then  # issue 4: QAT/eval speed ratios and peak memory, batch 128
  rm -f "$out/qat_speed.jsonl"
  for a in uniform:ivit uniform:ibert uniform:fqvit; do
    for m in fmnist-deit-tiny fmnist-vit-small fmnist-swin-tiny deit_tiny_patch16_224; do
      python3 benchmarks/bench_qat.py --model "$m" --batch 128 --assignment "$a" --device cuda --out "$out/qat_speed.jsonl"
    done
    python3 benchmarks/bench_qat.py --model deit_tiny_patch16_224 --batch 128 --assignment "$a" --device cuda \
      --compile --out "$out/qat_speed.jsonl"
  done
  python3 benchmarks/bench_methods.py --device cuda  # writes benchmarks/results/methods_cuda.{md,json}
fi

if [[ $step == all || $step == study ]]; then  # issue 4: the paper's Tables 2, 4, 5 on the zoo (re-run to resume)
  $cli study run studies/paper_tables.toml --device cuda --quiet
fi

if [[ $step == all || $step == search ]]; then  # issue 5: optuna+qat vs sqnr_diff at 6 bits, full QAT after
  for s in optuna sqnr_diff; do
    extra=()
    [[ $s == optuna ]] && extra=(--objective qat --n-trials 40 --qat-steps 200 --qat-holdout 5000)
    /usr/bin/time -f "%e" -o "$out/search6_${s}_seconds.txt" \
      $cli run --strategy "$s" --bits 6 --seed 0 --eval-size all --device cuda --out "runs/search6-$s" --quiet "${extra[@]}"
    $cli qat --assignment "runs/search6-$s/assignment.json" --epochs 3 --seed 0 --device cuda \
      --out "runs/search6-$s/qat" --quiet
  done
  $cli export --compare runs --csv studies/results/search6-optuna-vs-sqnr_diff-gpu.csv
fi
