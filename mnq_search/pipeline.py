"""The main job: float model -> quantized model -> sensitivity -> strategy -> assignment -> top-1.

:func:`run` is what ``mnq-search run`` does; :func:`evaluate_assignment` is ``mnq-search eval``.
Both validate every input before any heavy work and write their outputs only at the end,
each file through a temporary name (nothing half-written).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io as _io
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .calibrate import calibrate, evaluate
from .convert import QuantModel, convert_model
from .data import DataSource, open_data
from .errors import UsageError
from .io import atomic_write_json, atomic_write_text, csv_text
from .models import ModelInfo, load_model
from .plan import counts, load_assignment
from .quant import check_bits
from .runtime import EVAL_BATCH
from .sensitivity import ASQNR_FORMS, build_method_models, measure_sensitivity

SENSITIVITY_FIELDS = ("slot", "op", "method", "asqnr_in", "asqnr_out", "sqnr_diff")


@dataclass
class RunConfig:
    strategy: str = "sqnr_diff"
    model: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    bits: int = 8
    calib_size: int = 128
    eval_size: int | None = 2000  # None: the whole evaluation split
    batch_size: int = EVAL_BATCH
    sens_batch_size: int = 32
    out: str = "runs/default"
    seed: int = 0
    device: str | None = None
    asqnr_form: str = "amplitude"
    sensitivity: bool = False  # force the sensitivity pass for strategies that do not need it
    qat_epochs: int = 0  # > 0: QAT after the assignment is chosen (default QAT settings otherwise)
    fine_grid: bool = False  # exp/erf kernels on a grid no coarser than 2**-6 (not the references')
    download: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _check_common(bits: int, calib_size: int, eval_size: int | None, batch_size: int) -> None:
    try:
        check_bits(bits)
    except ValueError as exc:
        raise UsageError(f"--bits: {exc}") from None
    if calib_size <= 0:
        raise UsageError(f"--calib-size must be positive, got {calib_size}")
    if eval_size is not None and eval_size <= 0:
        raise UsageError(f"--eval-size must be positive or 'all', got {eval_size}")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")


def prepare(model_name, checkpoint, data_spec, download=False) -> tuple[torch.nn.Module, ModelInfo, DataSource]:
    model, info = load_model(model_name, checkpoint)
    data = open_data(data_spec, model, default=info.data, input_size=info.input_size, download=download)
    return model, info, data


def run(cfg: RunConfig) -> dict[str, Any]:
    """Run one strategy end to end; returns the result record (also written to ``cfg.out``)."""
    from strategies import SearchContext, get_strategy

    t_start = time.perf_counter()
    strategy = get_strategy(cfg.strategy)
    _check_common(cfg.bits, cfg.calib_size, cfg.eval_size, cfg.batch_size)
    if cfg.asqnr_form not in ASQNR_FORMS:
        raise UsageError(f"unknown ASQNR form {cfg.asqnr_form!r}; choose from: {', '.join(ASQNR_FORMS)}")
    device = cfg.device or default_device()
    torch.manual_seed(cfg.seed)
    model, info, data = prepare(cfg.model, cfg.checkpoint, cfg.data, cfg.download)
    opts = cfg.extra.get("optuna") or {}
    qat_objective = "qat" in (opts.get("objectives") or ())
    data.require(cfg.eval_size, cfg.calib_size, training=cfg.qat_epochs > 0 or qat_objective,
                 validation=opts.get("qat_holdout", 2000) if qat_objective else 0)
    model = model.to(device)
    timings: dict[str, float] = {}

    t = time.perf_counter()
    fp = evaluate(model, data.eval_batches(cfg.eval_size, cfg.batch_size), device,
                  cfg.progress, "float eval")
    timings["float_eval_s"] = time.perf_counter() - t

    qmodel = convert_model(model, cfg.bits, fine_grid=cfg.fine_grid).to(device)
    slot_ops = qmodel.slot_ops()
    rows = None
    if strategy.needs_sensitivity or cfg.sensitivity:
        cache = cfg.extra.get("sensitivity_cache")  # studies share one table per (model, bits)
        if cache and Path(cache).is_file():
            rows = read_sensitivity_csv(cache)
        else:
            rows, sens_timing = sensitivity_pass(model, qmodel, data, cfg, device)
            timings.update(sens_timing)
            if cache:
                atomic_write_text(cache, sensitivity_csv(rows))
    ctx = SearchContext(slot_ops=slot_ops, seed=cfg.seed, bits=cfg.bits, sensitivity=rows,
                        extra=dict(cfg.extra, model=model, qmodel=qmodel, data=data, device=device, config=cfg))
    strategy.before_search(ctx)
    assignment = strategy.select(ctx)
    strategy.after_search(ctx, assignment)

    qmodel.set_assignment(assignment)
    t = time.perf_counter()
    calibrate(qmodel, data.calib_batches(cfg.calib_size, cfg.batch_size), device)
    timings["calibrate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    qres = evaluate(qmodel, data.eval_batches(cfg.eval_size, cfg.batch_size), device,
                    cfg.progress, "quantized eval")
    timings["quant_eval_s"] = time.perf_counter() - t
    history = None
    if cfg.qat_epochs > 0:
        from .qat import QATConfig, make_eval_fn, train_qat

        t = time.perf_counter()
        qcfg = QATConfig(**{"epochs": cfg.qat_epochs, "seed": cfg.seed, **cfg.extra.get("qat", {})})
        eval_fn = make_eval_fn(data, cfg.eval_size, cfg.batch_size, device)
        history = train_qat(qmodel, data, qcfg, device, None, progress=cfg.progress, eval_fn=eval_fn)
        timings["qat_s"] = time.perf_counter() - t
        write_qat_outputs(Path(cfg.out), model, qmodel, history, data, cfg.calib_size, cfg.seed, device)
    timings["wall_s"] = time.perf_counter() - t_start

    result = _record(cfg, info, data, strategy.full_name, assignment, slot_ops, fp, qres, timings, device)
    result["sensitivity_measured"] = rows is not None
    if cfg.extra.get("search") is not None:  # joint search: the study summary (search.json)
        result["search"] = cfg.extra["search"]
    if history:
        result["qat_epochs"] = cfg.qat_epochs
        result["top1_ptq"] = result["top1_quant"]
        result["top1_quant"] = history[-1]["top1"]
        result["top5_ptq"] = result["top5_quant"]
        result["top5_quant"] = round(eval_fn.last["top5"], 3)
        result["qat_history"] = history
    write_outputs(Path(cfg.out), result, assignment, rows, cfg)
    return result


def sensitivity_pass(model, qmodel: QuantModel, data: DataSource, cfg: RunConfig, device) -> tuple[list[dict], dict]:
    """Calibrate one model per method, measure every slot; also time one float pass over the same
    calibration images (the reference of the sensitivity-time ratio in BENCHMARKS.md)."""
    from .methods import list_families

    methods = list(list_families())
    t = time.perf_counter()
    calib = lambda: data.calib_batches(cfg.calib_size, cfg.sens_batch_size)  # noqa: E731
    models = build_method_models(qmodel, methods, calib, device, cfg.progress)
    float_ref = qmodel.set_quant(False)
    try:
        rows = measure_sensitivity(float_ref, models, calib(), device, cfg.asqnr_form, cfg.progress)
    finally:
        qmodel.set_quant(True)
    sens_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        for x, _ in calib():
            model(x.to(device))
    float_s = time.perf_counter() - t
    return rows, {"sensitivity_s": sens_s, "float_pass_calib_s": float_s,
                  "sensitivity_over_float_pass": sens_s / max(float_s, 1e-9)}


def _record(cfg, info, data, strategy, assignment, slot_ops, fp, qres, timings, device) -> dict[str, Any]:
    return {
        "strategy": strategy,
        "model": info.name,
        "checkpoint": info.checkpoint,
        "data": data.spec,
        "data_embedded": bool(getattr(data, "embedded", False)),  # the default run's images from the package
        "bits": cfg.bits,
        "fine_grid": cfg.fine_grid,
        "counts": counts(assignment, slot_ops),
        "slots": {op: n for op, n in _count_ops(slot_ops).items()},
        "top1_fp": round(fp["top1"], 3),
        "top5_fp": round(fp["top5"], 3),
        "top1_quant": round(qres["top1"], 3),
        "top5_quant": round(qres["top5"], 3),
        "eval_images": qres["images"],
        "eval_size": "all" if cfg.eval_size is None else cfg.eval_size,
        "calib_images": cfg.calib_size,
        "seed": cfg.seed,
        "asqnr_form": cfg.asqnr_form,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "wall_time_s": round(timings["wall_s"], 2),
        "device": device_name(device),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["mnq-search"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith("mnq-search") else None,
        "torch": torch.__version__,
        "weights": {k: info.weights_meta.get(k) for k in ("epochs", "top1", "date", "device")} if info.weights_meta else None,
    }


def _count_ops(slot_ops) -> dict[str, int]:
    out = {"softmax": 0, "gelu": 0, "layernorm": 0}
    for op in slot_ops.values():
        out[op] += 1
    return out


def read_sensitivity_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("asqnr_in", "asqnr_out", "sqnr_diff"):
            r[k] = float(r[k])
    return rows


def sensitivity_csv(rows: list[dict]) -> str:
    return csv_text(SENSITIVITY_FIELDS, rows)


def write_outputs(out: Path, result: dict, assignment: dict, rows: list[dict] | None, cfg: RunConfig) -> None:
    """Write assignment.json, sensitivity.csv (when measured) and result.json, each atomically;
    result.json last, so its presence marks a finished run."""
    out.mkdir(parents=True, exist_ok=True)
    from .plan import save_assignment

    save_assignment(out / "assignment.json", assignment, model=result["model"], bits=result["bits"],
                    fine_grid=result["fine_grid"], strategy=result["strategy"], seed=result["seed"])
    if rows is not None:
        atomic_write_text(out / "sensitivity.csv", sensitivity_csv(rows))
    record = dict(result, config={k: v for k, v in asdict(cfg).items() if k != "extra"})
    atomic_write_json(out / "result.json", record)


def evaluate_assignment(assignment_file: str, model_name=None, checkpoint=None, data_spec=None, bits=None,
                        calib_size=128, eval_size=2000, batch_size=EVAL_BATCH, seed=0, device=None,
                        results_file: str | None = None, progress=True, fine_grid: bool | None = None) -> dict[str, Any]:
    """``mnq-search eval``: calibrate and evaluate the model with a given assignment."""
    from .io import read_json

    meta = read_json(assignment_file, "assignment file")
    bits = bits or (meta.get("bits") if isinstance(meta, dict) else None) or 8
    model_name = model_name or (meta.get("model") if isinstance(meta, dict) else None)
    fine_grid = fine_grid if fine_grid is not None else bool(isinstance(meta, dict) and meta.get("fine_grid"))
    _check_common(bits, calib_size, eval_size, batch_size)
    device = device or default_device()
    torch.manual_seed(seed)
    model, info, data = prepare(model_name, checkpoint, data_spec)
    data.require(eval_size, calib_size)
    model = model.to(device)
    qmodel = convert_model(model, bits, fine_grid=fine_grid).to(device)
    assignment, _ = load_assignment(assignment_file, qmodel.slot_ops())
    qmodel.set_assignment(assignment)
    calibrate(qmodel, data.calib_batches(calib_size, batch_size), device)
    res = evaluate(qmodel, data.eval_batches(eval_size, batch_size), device, progress, "quantized eval")
    out = {"model": info.name, "bits": bits, "fine_grid": fine_grid, "assignment": str(assignment_file),
           "counts": counts(assignment, qmodel.slot_ops()), "top1": round(res["top1"], 3),
           "top5": round(res["top5"], 3), "images": res["images"], "seconds": round(res["seconds"], 2),
           "device": device_name(device)}
    if results_file:
        _append_results_csv(Path(results_file), out)
    return out


def _append_results_csv(path: Path, row: dict) -> None:
    """Append one row (timm validate.py's --results-file), rewriting the file atomically."""
    flat = {k: v for k, v in row.items() if k != "counts"}
    old = path.read_text() if path.is_file() else ""
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(flat), lineterminator="\n")
    if not old:
        w.writeheader()
    w.writerow(flat)
    atomic_write_text(path, old + buf.getvalue())


@dataclass
class QATJob:
    assignment: str
    out: str | None = None
    resume: str | None = None
    model: str | None = None
    checkpoint: str | None = None
    data: str | None = None
    bits: int | None = None
    calib_size: int = 128
    eval_size: int | None = 2000
    eval_batch_size: int = EVAL_BATCH
    device: str | None = None
    progress: bool = True
    fine_grid: bool | None = None  # None: as the assignment file says


def write_qat_outputs(out: Path, model, qmodel: QuantModel, history: list[dict], data: DataSource,
                      calib_size: int, seed: int, device) -> None:
    """``history.csv`` and ``slot_asqnr.csv`` (every slot's output ASQNR after QAT against the float
    model on up to 64 calibration images: the paper's Figure 3) of a trained ``qmodel``."""
    from .qat import history_csv
    from .sensitivity import measure_slots

    float_ref = convert_model(model, qmodel.bits, fine_grid=qmodel.fine_grid).to(device).set_quant(False)
    slot_rows = measure_slots(float_ref, {"qat": qmodel}, data.calib_batches(min(calib_size, 64), 32), device)
    atomic_write_text(out / "slot_asqnr.csv", csv_text(("slot", "op", "asqnr_out"), slot_rows))
    atomic_write_text(out / "history.csv", history_csv(history))


def qat_job(job: QATJob, qcfg) -> dict[str, Any]:
    """``mnq-search qat``: calibrate the assigned model, train it, evaluate after every epoch, and write
    history.csv, checkpoint.pt, slot_asqnr.csv (per-slot output ASQNR after QAT, against the float
    model: the paper's Figure 3), qat_model.safetensors and result.json into ``out``."""
    from . import distributed as dist
    from .io import read_json, save_weights
    from .plan import save_assignment
    from .qat import make_eval_fn, train_qat

    out = Path(job.out or job.resume or "runs/qat")
    if job.resume and not (Path(job.resume) / "checkpoint.pt").is_file():
        raise UsageError(f"nothing to resume: {Path(job.resume) / 'checkpoint.pt'} not found")
    meta = read_json(job.assignment, "assignment file")
    bits = job.bits or (meta.get("bits") if isinstance(meta, dict) else None) or 8
    model_name = job.model or (meta.get("model") if isinstance(meta, dict) else None)
    fine_grid = job.fine_grid if job.fine_grid is not None else bool(isinstance(meta, dict) and meta.get("fine_grid"))
    _check_common(bits, job.calib_size, job.eval_size, job.eval_batch_size)
    qcfg.validate()
    device = dist.init(job.device or default_device())
    model, info, data = prepare(model_name, job.checkpoint, job.data)
    data.require(job.eval_size, job.calib_size, training=True)
    model = model.to(device)
    qmodel = convert_model(model, bits, fine_grid=fine_grid).to(device)
    assignment, _ = load_assignment(job.assignment, qmodel.slot_ops())
    qmodel.set_assignment(assignment)
    calibrate(qmodel, data.calib_batches(job.calib_size, job.eval_batch_size), device)
    eval_fn = make_eval_fn(data, job.eval_size, job.eval_batch_size, device, progress=job.progress)
    top1_ptq = eval_fn(qmodel) if dist.is_main() else None
    t = time.perf_counter()
    history = train_qat(qmodel, data, qcfg, device, out, teacher=model if qcfg.distill else None,
                        resume=bool(job.resume), eval_fn=eval_fn, progress=job.progress)
    seconds = time.perf_counter() - t
    result = {}
    if dist.is_main():
        write_qat_outputs(out, model, qmodel, history, data, job.calib_size, qcfg.seed, device)
        save_weights(qmodel, out / "qat_model.safetensors", dtype=torch.float32)
        save_assignment(out / "assignment.json", assignment, model=info.name, bits=bits, fine_grid=fine_grid,
                        strategy=meta.get("strategy") if isinstance(meta, dict) else None)
        result = {"strategy": meta.get("strategy") if isinstance(meta, dict) else None, "model": info.name,
                  "bits": bits, "fine_grid": fine_grid, "counts": counts(assignment, qmodel.slot_ops()),
                  "top1_ptq": top1_ptq,
                  "top1_qat": history[-1]["top1"] if history else None, "history": history,
                  "qat": asdict(qcfg), "world_size": dist.world(), "qat_seconds": round(seconds, 1),
                  "device": device_name(device), "date": _dt.datetime.now().isoformat(timespec="seconds")}
        atomic_write_json(out / "result.json", result)
    dist.barrier()
    return result
