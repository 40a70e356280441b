"""``mnq-search qat``: QAT of an assignment, with per-epoch evaluation, exact resume and the files
of the paper's Figures 3 and 4."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..calibrate import calibrate, evaluate
from ..context import RunSettings
from ..convert import QuantModel, convert_model
from ..data import DataSource
from ..errors import UsageError
from ..io import atomic_write_json, atomic_write_text, csv_text, save_weights
from ..plan import counts, save_assignment
from ..qat import QATConfig, history_csv, make_eval_fn, train_qat
from ._assignment_run import open_with_assignment, settings_from_assignment
from ._device import default_device, device_name
from ._run import sets_weight_bits
from ..preflight import check_output_dir


def write_qat_outputs(out: Path, model, qmodel: QuantModel, history: list[dict], data: DataSource,
                      calib_size: int, device) -> None:
    """``history.csv`` and ``slot_asqnr.csv`` (every slot's output ASQNR after QAT against the float
    model on up to 64 calibration images: the paper's Figure 3) of a trained ``qmodel``."""
    from ..sensitivity import measure_slots

    float_ref = convert_model(model, qmodel.bits, fine_grid=qmodel.fine_grid, nl_bits=qmodel.nl_bits).to(device)
    float_ref.set_quant(False)
    slot_rows = measure_slots(float_ref, {"qat": qmodel}, data.calib_batches(min(calib_size, 64), 32), device)
    atomic_write_text(out / "slot_asqnr.csv", csv_text(("slot", "op", "asqnr_out"), slot_rows))
    atomic_write_text(out / "history.csv", history_csv(history))


def qat_job(assignment_file: str, settings: RunSettings, qcfg: QATConfig, out: str | None = None,
            resume: str | None = None, bits_given: bool = False, fine_grid_given: bool = False) -> dict[str, Any]:
    """Calibrate the assigned model, train it, evaluate after every epoch, and write history.csv,
    checkpoint.pt, slot_asqnr.csv (per-slot output ASQNR after QAT, against the float model: the
    paper's Figure 3), qat_model.safetensors and result.json into ``out`` (default: the ``resume``
    folder, else runs/qat)."""
    folder = Path(out or resume or "runs/qat")
    if resume and not (Path(resume) / "checkpoint.pt").is_file():
        raise UsageError(f"nothing to resume: {Path(resume) / 'checkpoint.pt'} not found")
    settings, meta = settings_from_assignment(assignment_file, settings, bits_given, fine_grid_given)
    qcfg.validate()
    check_output_dir(folder)
    settings = dataclasses.replace(settings, device=dist.init(settings.device or default_device()))
    ctx, assignment = open_with_assignment(assignment_file, settings, training=True)
    qmodel, device = ctx.qmodel, ctx.device
    calibrate(qmodel, ctx.calib_batches(), device)
    eval_fn = make_eval_fn(ctx.data, settings.eval_size, settings.batch_size, device, progress=settings.progress)
    top1_ptq = eval_fn(qmodel) if dist.is_main() else None
    t = time.perf_counter()
    history = train_qat(qmodel, ctx.data, qcfg, device, folder, teacher=ctx.model,
                        resume=bool(resume), eval_fn=eval_fn, progress=settings.progress)
    seconds = time.perf_counter() - t
    result: dict[str, Any] = {}
    if dist.is_main():
        write_qat_outputs(folder, ctx.model, qmodel, history, ctx.data, settings.calib_size, device)
        save_weights(qmodel, folder / "qat_model.safetensors", dtype=torch.float32)
        save_assignment(folder / "assignment.json", assignment, model=ctx.info.name, bits=settings.bits,
                        nl_bits=settings.nl_bits or settings.bits, fine_grid=settings.fine_grid,
                        strategy=meta.get("strategy"),
                        **({"post_ln": settings.post_ln} if settings.post_ln != "tensor" else {}))
        result = {"strategy": meta.get("strategy"), "model": ctx.info.name, "bits": settings.bits,
                  "fine_grid": settings.fine_grid, "counts": counts(assignment, ctx.slot_ops), "top1_ptq": top1_ptq,
                  "top1_qat": history[-1]["top1"] if history else None, "history": history,
                  "qat": dataclasses.asdict(qcfg), "world_size": dist.world(), "qat_seconds": round(seconds, 1),
                  "device": device_name(device), "date": _dt.datetime.now().isoformat(timespec="seconds"),
                  "out": str(folder)}
        if sets_weight_bits(assignment, qmodel):  # every weight layer's (weight, activation) bits, as a run records them
            from ..mixprec import bits_summary

            result["layer_bits"] = bits_summary(qmodel)
        if settings.record_images:  # a study's statistics: per-image correctness after the last evaluation
            from ..stats import pack
            from ._run import record_correct

            vres = evaluate(qmodel, ctx.validation_batches(settings.val_eval_size or ctx.data.validation_size), device,
                            False, "validation eval")
            result["top1_val"] = round(vres["top1"], 3)
            record_correct(folder, "correct.npz", test=pack(eval_fn.last["correct"].numpy()), n=eval_fn.last["images"])
        atomic_write_json(folder / "result.json", result)
    dist.barrier()
    return result

