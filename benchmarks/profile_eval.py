"""Where one quantized evaluation batch spends its time, as a share of the batch.

The embedded default (or --model) with one method family in every slot, one evaluation batch
(--batch, default 100) under ``torch.inference_mode``, the median of --repeats timed batches. The
forward of each kind of module is wrapped with a timer (exclusive categories):

- ``linear layers``: ``QLinear`` / ``QConv2d`` (their input quantizer, the integer product, bias and
  scale);
- ``attention matmuls``: q k^T and attn v (``QuantMatMul``);
- ``softmax`` / ``gelu`` / ``layernorm``: the slots (their input quantizer and the method);
- ``other``: the rest of the batch (the float model's own code between modules: residual adds,
  reshapes, position embedding, pooling, head bias);

and, across categories, ``of which input quantizers``: every ``ActQuant`` call. The float model's
batch time on the same images is printed as the reference. The script uses only names that exist
in every version of the project since the first round, so the same file profiles an older checkout
(``--root``), which is how BENCHMARKS.md's before/after table was made.

    python benchmarks/profile_eval.py --methods ibert,fqvit,ivit
    python benchmarks/profile_eval.py --root /tmp/old-checkout     # the code of another checkout
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="checkout to profile")
    ap.add_argument("--model", default=None)
    ap.add_argument("--methods", default="ibert,fqvit,ivit")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="write the shares to this file")
    args = ap.parse_args()
    sys.path.insert(0, args.root)
    import mnq_search  # noqa: F401  (before torch: its OpenMP setting, where the version has one)
    import torch

    from mnq_search.attention import QuantAttention  # noqa: F401
    from mnq_search.calibrate import calibrate
    from mnq_search.convert import convert_model
    from mnq_search.data import open_data
    from mnq_search.models import load_model
    from mnq_search.quant import ActQuant, QConv2d, QLinear, QuantMatMul
    from mnq_search.runtime import keep_freed_memory
    try:
        from mnq_search.methods import uniform_assignment
    except ImportError:  # checkouts before the family registry
        from mnq_search.sensitivity import uniform_for as uniform_assignment
    from mnq_search.slot import NonLinearSlot

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    model, info = load_model(args.model)
    data = open_data(None, model, default=info.data)
    x, _ = next(data.eval_batches(args.batch, args.batch))
    times: dict[str, float] = defaultdict(float)
    depth = [0]

    def timed(cls, attr, key):
        orig = getattr(cls, attr)

        def wrapper(self, *a, **k):
            name = key(self) if callable(key) else key
            outer = depth[0] == 0 or name == "input quantizers"
            if name != "input quantizers":
                depth[0] += 1
            t = time.perf_counter()
            try:
                return orig(self, *a, **k)
            finally:
                if name != "input quantizers":
                    depth[0] -= 1
                if outer:
                    times[name] += time.perf_counter() - t
        setattr(cls, attr, wrapper)

    results = {}
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        t_float = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            model(x)
            t_float.append(time.perf_counter() - t)
        float_s = sorted(t_float)[len(t_float) // 2]
    timed(QLinear, "forward", "linear layers")
    timed(QConv2d, "forward", "linear layers")
    timed(QuantMatMul, "forward", "attention matmuls")
    if hasattr(QuantMatMul, "forward_q"):
        timed(QuantMatMul, "forward_q", "attention matmuls")
    timed(NonLinearSlot, "forward", lambda s: s.op)
    timed(ActQuant, "quantize", "input quantizers")
    if hasattr(ActQuant, "quantize_int8"):
        timed(ActQuant, "quantize_int8", "input quantizers")
    for method in args.methods.split(","):
        q = convert_model(model, 8)
        q.set_assignment(uniform_assignment(method, q.slot_ops()))
        calibrate(q, data.calib_batches(128, args.batch))
        q.eval()
        with torch.inference_mode():
            for _ in range(2):
                q(x)
            runs = []
            for _ in range(args.repeats):
                times.clear()
                t = time.perf_counter()
                q(x)
                total = time.perf_counter() - t
                runs.append((total, dict(times)))
        total, parts = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
        parts["other"] = total - sum(v for k, v in parts.items() if k != "input quantizers")
        results[method] = {"batch_ms": 1e3 * total, "float_batch_ms": 1e3 * float_s,
                           "shares": {k: v / total for k, v in parts.items()}}
    order = ["linear layers", "attention matmuls", "softmax", "gelu", "layernorm", "other", "input quantizers"]
    print(f"| part | " + " | ".join(results) + " |")
    print("|---|" + "---:|" * len(results))
    for k in order:
        label = "of which input quantizers" if k == "input quantizers" else k
        print(f"| {label} | " + " | ".join(f"{100 * r['shares'].get(k, 0):.0f} %" for r in results.values()) + " |")
    print("| batch (ms) | " + " | ".join(f"{r['batch_ms']:.0f}" for r in results.values()) + " |")
    print("| float model batch (ms) | " + " | ".join(f"{r['float_batch_ms']:.0f}" for r in results.values()) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
