"""QAT and evaluation speed of a quantized model, as ratios to the float model in the same run.

For a model (zoo name, or timm name with random weights) and a batch size it measures, in one
process and on the same batch:

- training images/s: float training step vs QAT training step (forward, backward, AdamW step);
- evaluation images/s: float vs quantized forward under ``torch.inference_mode``;
- peak memory of a training step (CUDA: ``max_memory_allocated``; CPU: not measured).

Goals (issue 4): QAT/float training >= 0.5, quantized/float eval >= 0.5, peak memory <= 2x float.
Speed is a benchmark, never a unit test. Example:

    python benchmarks/bench_qat.py --model deit_tiny_patch16_224 --batch 128 --assignment uniform:ivit
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mnq_search  # noqa: E402,F401  (before torch: its OpenMP setting, see mnq_search/__init__.py)
import torch  # noqa: E402
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnq_search.calibrate import calibrate  # noqa: E402
from mnq_search.convert import convert_model  # noqa: E402
from mnq_search.models import load_model  # noqa: E402
from mnq_search.runtime import keep_freed_memory  # noqa: E402
from mnq_search.methods import uniform_assignment  # noqa: E402


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def train_step_fn(model, x, y, opt):
    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def peak_mem(fn, device):
    if not device.startswith("cuda"):
        return None
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated() / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fmnist-deit-tiny")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--assignment", default="uniform:ivit", help="uniform:<family> (default: uniform:ivit)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="torch.compile both models (inductor)")
    ap.add_argument("--out", default=None, help="append the JSON record to this file")
    args = ap.parse_args()
    keep_freed_memory()  # as the CLI does
    dev = args.device
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model, info = load_model(args.model, random_weights=True)
    model = model.to(dev)
    size = info.input_size
    chans = model.patch_embed.proj.in_channels
    torch.manual_seed(0)
    x = torch.randn(args.batch, chans, size, size, device=dev)
    y = torch.randint(0, model.num_classes, (args.batch,), device=dev)
    q = convert_model(model, args.bits).to(dev)
    q.set_assignment(uniform_assignment(args.assignment.split(":")[-1], q.slot_ops()))
    calibrate(q, [(x, y)], dev)
    fmodel, qmodel = model, q
    if args.compile:
        fmodel, qmodel = torch.compile(model), torch.compile(q)
    rec = {"model": args.model, "batch": args.batch, "bits": args.bits, "assignment": args.assignment,
           "compile": args.compile, "date": _dt.date.today().isoformat(), "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if dev.startswith("cuda") else f"cpu ({platform.machine()}, "
                                                                                  f"{torch.get_num_threads()} threads)",
           "command": " ".join(sys.argv)}
    for label, m in (("float", fmodel), ("quant", qmodel)):
        m.train()
        opt = torch.optim.AdamW([p for p in (model if label == "float" else q).parameters()], lr=1e-6)
        step = train_step_fn(m, x, y, opt)
        rec[f"train_{label}_img_s"] = args.batch / timed(step, dev, args.repeats)
        rec[f"train_{label}_peak_gib"] = peak_mem(step, dev)
        m.eval()
        with torch.inference_mode():
            rec[f"eval_{label}_img_s"] = args.batch / timed(lambda: m(x), dev, args.repeats)
    rec["train_ratio"] = rec["train_quant_img_s"] / rec["train_float_img_s"]
    rec["eval_ratio"] = rec["eval_quant_img_s"] / rec["eval_float_img_s"]
    if rec["train_float_peak_gib"]:
        rec["memory_ratio"] = rec["train_quant_peak_gib"] / rec["train_float_peak_gib"]
    print(json.dumps(rec, indent=2))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
