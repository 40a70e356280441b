"""Speed of every registered integer non-linear method, as ratios to the float op it replaces.

For each op in ``mnq_search.methods.NONLINEAR_METHODS`` and each of its methods (bits=8), on the
realistic inputs of ``mnq_search.testing.realistic_input`` at DeiT-Tiny 224x224 shapes (softmax
(B, 3, 197, 197), gelu (B, 197, 768), layernorm (B, 197, 192) with a 16-bit input; B = --batch),
after one call in train() mode to calibrate and then eval(), it times (median of --repeats after
warm-up, each method interleaved call by call with its float reference):

1. ``train fwd``: the training / evaluation path ``module(x, s_x)`` (the fast path: tables and
   compiled row loops, :mod:`mnq_search.methods._fast`) vs the float op forward (inference_mode);
2. ``train fwd+bwd``: the same with ``x.requires_grad`` and ``loss = (y * w).sum()`` backward, vs
   the float op forward+backward (LayerNorm weight and bias receive gradients in both);
3. ``fast integers``: the fast path writing the output integers (``module.run_fast(q, s_x,
   integers=True)``), what the bit-identity tests compare with the integer path;
4. ``reference fwd``: the training path with the fast path off (the reference kernel on float-held
   integers, what every method ran before the fast path);
5. ``reference int64``: the integer path ``module.forward_int(q, s_x)``, int64 with every register
   range checked (it synchronizes with the host for the checks; the specification, not optimized).

The float op is ``module.float_op(x, *module.grad_params())`` (torch.softmax / F.gelu /
F.layer_norm). The train() calibration (``observe`` hooks) is not timed. The ratios are measured
within one run on one machine, so background load on shared cores mostly cancels; absolute times
are for context only. Speed is a benchmark, never a unit test: nothing here asserts a speed.

--threads defaults to 2, the CPU machines' core count: the fast path splits rows over the torch
thread count. On cores busy with another job every multi-threaded op waits for its second worker:
stop other jobs first, or pass --threads 1.

Output: a Markdown table on stdout and in benchmarks/results/methods_<device>.md, with the same
rows as JSON in methods_<device>.json.   Usage: python benchmarks/bench_methods.py [--device cuda]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import mnq_search  # noqa: E402,F401  (before torch: its OpenMP setting, see mnq_search/__init__.py)
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .` (make bench installs it)

from mnq_search.methods import NONLINEAR_METHODS  # noqa: E402
from mnq_search.integer import fast_kernels  # noqa: E402
from mnq_search.methods import make_nonlinear  # noqa: E402
from mnq_search.runtime import keep_freed_memory  # noqa: E402
from mnq_search.testing import affine_layernorm, realistic_input  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def shapes(batch: int) -> dict[str, dict[str, int]]:
    """DeiT-Tiny at 224x224: 197 tokens, 3 heads, width 192, MLP width 768."""
    return {"softmax": dict(batch=batch, heads=3, tokens=197),
            "gelu": dict(batch=batch, tokens=197, channels=768),
            "layernorm": dict(batch=batch, tokens=197, channels=192)}


def interleaved_medians(fns, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Median seconds per call of each function, calling them in turn so that load drifts hit all."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: list[list[float]] = [[] for _ in fns]
    for i in range(warmup + repeats):
        for fn, ts in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def bench_method(op: str, method: str, x: torch.Tensor, s_x: torch.Tensor, args) -> dict:
    ln = affine_layernorm(x.shape[-1]) if op == "layernorm" else None
    mod = make_nonlinear(op, method, bits=8, float_module=ln).to(x.device)
    mod.train()
    with torch.no_grad():
        mod(x, s_x)  # calibration (observe hooks), not timed
    mod.eval()
    params = mod.grad_params()
    q = (x / s_x).round().long()
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    xg = x.detach().clone().requires_grad_(True)
    leaves = (xg, *params)

    def inference(fn):
        def call():
            with torch.inference_mode():
                fn()
        return call

    def backward(fn):
        def call():
            for t in leaves:
                t.grad = None
            (fn(xg) * w).sum().backward()
        return call

    qf = q.float()
    sx = float(s_x)
    assert mod.run_fast(qf, sx, integers=True) is not None, f"{op} {method}: no fast path"

    def reference(fn):
        def call():
            with fast_kernels(False):
                fn()
        return call

    # the fast paths and the slow reference paths are timed in separate rounds (each against the
    # float op): calls interleaved with the reference's large temporaries run on cold caches
    float_fwd, train_fwd, fast_int = interleaved_medians(
        [inference(lambda: mod.float_op(x, *params)), inference(lambda: mod(x, s_x)),
         inference(lambda: mod.run_fast(qf, sx, integers=True))], args.repeats, args.warmup, x.device)
    float_ref, ref_fwd, int_fwd = interleaved_medians(
        [inference(lambda: mod.float_op(x, *params)), inference(reference(lambda: mod(x, s_x))),
         inference(lambda: mod.forward_int(q, s_x))], max(3, args.repeats // 4), args.warmup, x.device)
    float_bwd, train_bwd = interleaved_medians(
        [backward(lambda t: mod.float_op(t, *params)), backward(lambda t: mod(t, s_x)[0])],
        args.repeats, args.warmup, x.device)
    return {"op": op, "method": method, "shape": list(x.shape),
            "float_fwd_ms": 1e3 * float_fwd, "float_fwd_bwd_ms": 1e3 * float_bwd,
            "train_fwd_ratio": train_fwd / float_fwd, "train_fwd_bwd_ratio": train_bwd / float_bwd,
            "fast_int_ratio": fast_int / float_fwd, "reference_fwd_ratio": ref_fwd / float_ref,
            "int_fwd_ratio": int_fwd / float_ref}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    n = torch.get_num_threads()
    return f"{cpu}, {n} thread{'' if n == 1 else 's'}"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Integer non-linear methods: speed relative to the float op ({meta['device']})", "",
             f"- date: {meta['date']}", f"- device: {meta['device_name']}", f"- torch: {meta['torch']}",
             f"- command: `{meta['command']}`", f"- repeats: {meta['repeats']} (median, after "
             f"{meta['warmup']} warm-up), bits=8, DeiT-Tiny 224x224 shapes, batch {meta['batch']}",
             "- ratios are measured within this run, interleaved with the float op, so load from other "
             "jobs on the machine mostly cancels; absolute times are for context only", "",
             "| op | method | shape | float fwd (ms) | float fwd+bwd (ms) | train fwd / float "
             "| train fwd+bwd / float | fast integers / float | reference fwd / float | reference int64 / float |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['method']} | {'x'.join(map(str, r['shape']))} "
                     f"| {r['float_fwd_ms']:.2f} | {r['float_fwd_bwd_ms']:.2f} | {r['train_fwd_ratio']:.2f}x "
                     f"| {r['train_fwd_bwd_ratio']:.2f}x | {r['fast_int_ratio']:.2f}x | {r['reference_fwd_ratio']:.1f}x "
                     f"| {r['int_fwd_ratio']:.1f}x |")
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
        f.write(text)
    os.replace(f.name, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=8, help="batch size (DeiT-Tiny inference: 8)")
    p.add_argument("--repeats", type=int, default=40,
                   help="timed calls per measurement (median; the reference paths get a quarter)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed ones")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (see the module docstring)")
    p.add_argument("--methods", default=None,
                   help="comma-separated families to measure (default: all; the output files get their names)")
    args = p.parse_args(argv)
    only = None if args.methods is None else set(args.methods.split(","))
    keep_freed_memory()  # as the CLI does
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)

    rows = []
    for op, methods in NONLINEAR_METHODS.items():
        x, s_x = realistic_input(op, 8, **shapes(args.batch)[op])
        x, s_x = x.to(device), s_x.to(device)
        for method in methods:
            if only is not None and method not in only:
                continue
            rows.append(bench_method(op, method, x, s_x, args))
            print(f"  done: {op} {method}", file=sys.stderr, flush=True)

    meta = {"date": datetime.date.today().isoformat(), "device": device.type, "device_name": device_name(device),
            "torch": torch.__version__, "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
            "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
            "threads": torch.get_num_threads()}
    table = markdown(meta, rows)
    print(table, end="")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"methods_{device.type}" + ("" if only is None else "_" + "_".join(sorted(only)))
    write_atomic(RESULTS / f"{stem}.md", table)
    write_atomic(RESULTS / f"{stem}.json", json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
