"""``mnq-search run``: float model -> quantized model -> sensitivity -> strategy -> assignment -> top-1.

Every input is checked before any heavy work (the output folder, the storage, the checkpoint, the
data, the options), and the outputs are written only at the end, each file through a temporary name.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..calibrate import calibrate, evaluate
from ..context import RunContext, RunSettings
from ..plan import counts
from ..slot import split_layer_keys
from ._build import open_run
from ._device import device_name
from ._outputs import read_sensitivity_csv, sensitivity_csv, write_run_outputs
from ..preflight import check_output_dir, check_output_file, check_storage


def preflight_run(settings: RunSettings) -> None:
    """The checks of ``run`` that need no model: settings, output folder, storage, cache file."""
    settings.validate()
    check_output_dir(settings.out)
    if settings.search is not None:
        from ..search import default_storage_url

        check_storage(settings.search.storage or default_storage_url(settings.out))
    if settings.sensitivity_cache:
        check_output_file(settings.sensitivity_cache, "--sensitivity-cache")


def run(settings: RunSettings) -> dict[str, Any]:
    """Run one strategy end to end; returns the result record (also written to ``settings.out``)."""
    from strategies import get_strategy

    t_start = time.perf_counter()
    preflight_run(settings)
    strategy = get_strategy(settings.strategy)
    search = settings.search
    uses_qat = search is not None and "qat" in search.objectives
    from ..groups import parse_groups

    groups = parse_groups(settings.groups)
    ctx = open_run(settings, training=settings.qat_epochs > 0 or uses_qat,
                   validation=max(strategy.validation_images(settings),
                                  settings.val_size if groups.kind == "alloc" else 0))
    if groups.kind != "alloc" and not groups.is_default:  # the strategy sees the model it chooses for
        from ..groups import set_groups, uniform_groups

        set_groups(ctx.qmodel, uniform_groups(ctx.qmodel, groups))
    timings: dict[str, float] = {}

    t = time.perf_counter()
    fp = evaluate(ctx.model, ctx.data.eval_batches(settings.eval_size, settings.batch_size), ctx.device,
                  settings.progress, "float eval")
    timings["float_eval_s"] = time.perf_counter() - t

    if strategy.needs_sensitivity or settings.sensitivity:
        ctx.sensitivity = _sensitivity(ctx, timings)
    outcome = strategy.run(ctx)
    assignment = outcome.assignment

    qmodel = ctx.qmodel
    qmodel.set_assignment(assignment)
    _, layer_bits, layer_groups = split_layer_keys(assignment)
    searched_groups = settings.joint_groups or bool(layer_groups)
    group_record = (_apply_groups(ctx, groups, assignment, timings, searched_groups)
                    if searched_groups or not groups.is_default else None)
    if group_record is not None:  # the assignment file keeps them (layer_groups), so eval and qat reproduce the run
        from ..slot import groups_key

        assignment = {**assignment, **{groups_key(n): g for n, g in group_record["layers"].items()}}
    t = time.perf_counter()
    calibrate(qmodel, ctx.calib_batches(), ctx.device)
    timings["calibrate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    qres = evaluate(qmodel, ctx.data.eval_batches(settings.eval_size, settings.batch_size), ctx.device,
                    settings.progress, "quantized eval", keep_correct=settings.record_images)
    timings["quant_eval_s"] = time.perf_counter() - t
    extra: dict[str, Any] = {}
    if settings.record_images:  # what a study's statistics and selection need
        from ..stats import pack

        vres = evaluate(qmodel, ctx.validation_batches(settings.val_eval_size or ctx.data.validation_size), ctx.device,
                        settings.progress, "validation eval")
        extra = {"top1_val": round(vres["top1"], 3), "val_images": vres["images"]}
        record_correct(Path(settings.out), "correct.npz", test=pack(qres["correct"].numpy()), n=qres["images"])
    history = eval_fn = None
    if settings.qat_epochs > 0:
        from ..qat import make_eval_fn, train_qat
        from ._qat import write_qat_outputs

        t = time.perf_counter()
        eval_fn = make_eval_fn(ctx.data, settings.eval_size, settings.batch_size, ctx.device)
        history = train_qat(qmodel, ctx.data, ctx.qat_config(epochs=settings.qat_epochs), ctx.device, None,
                            teacher=ctx.model, progress=settings.progress, eval_fn=eval_fn)
        timings["qat_s"] = time.perf_counter() - t
        write_qat_outputs(Path(settings.out), ctx.model, qmodel, history, ctx.data, settings.calib_size, ctx.device)
    timings["wall_s"] = time.perf_counter() - t_start

    result = _record(ctx, strategy.full_name, assignment, fp, qres, timings)
    result.update(extra)
    if group_record is not None:
        result["groups"] = group_record
    slot_bits = qmodel.slot_bits()
    if settings.joint_bits or sets_weight_bits(assignment, qmodel):
        from ..mixprec import bits_summary

        result["layer_bits"] = bits_summary(qmodel)
    if settings.joint_nl_bits or set(layer_bits) & set(slot_bits):  # the attention products count with them
        from ..mixprec import attention_bops, attention_macs

        x = next(iter(ctx.calib_batches()))[0].to(ctx.device)
        result["slot_bits"] = {"slots": slot_bits,
                               "attention_bops_per_image": attention_bops(attention_macs(qmodel, x), slot_bits)}
    result["sensitivity_measured"] = ctx.sensitivity is not None
    if outcome.search is not None:
        result["search"] = outcome.search
    if history:
        result["qat_epochs"] = settings.qat_epochs
        result["top1_ptq"] = result["top1_quant"]
        result["top1_quant"] = history[-1]["top1"]
        result["top5_ptq"] = result["top5_quant"]
        result["top5_quant"] = round(eval_fn.last["top5"], 3)
        result["qat_history"] = history
    result["files"] = write_run_outputs(Path(settings.out), result, assignment, ctx.sensitivity,
                                        outcome.search, outcome.pareto)
    return result


def _apply_groups(ctx: RunContext, groups, assignment, timings: dict[str, float], searched: bool = False) -> dict[str, Any]:
    """Set the group layers of ``--groups alloc:G`` (allocated on validation for ``assignment``);
    returns what result.json records of the groups: the setting (``searched`` when the strategy chose
    them, ``--joint-groups``), every layer's count, the BOPs per image and, allocated, the budget and
    the sensitivity table."""
    from ..groups import (allocate_groups, get_groups, group_sensitivity, layer_shapes, set_groups, total_cost,
                          uniform_groups)

    x = next(iter(ctx.calib_batches()))[0].to(ctx.device)
    shapes = layer_shapes(ctx.qmodel, x)
    record: dict[str, Any] = {"setting": "searched" if searched else str(groups)}
    if groups.kind == "alloc":
        from ..incremental import evaluator_for

        t = time.perf_counter()
        set_groups(ctx.qmodel, {name: 1 for name in shapes})
        sens = group_sensitivity(evaluator_for(ctx), assignment, shapes, progress=ctx.settings.progress)
        budget = total_cost(shapes, uniform_groups(ctx.qmodel, groups.groups))
        alloc = allocate_groups(sens, shapes, budget)
        set_groups(ctx.qmodel, alloc.groups)
        timings["group_allocation_s"] = time.perf_counter() - t
        record.update(budget_bops=budget, estimated_kl=alloc.estimated_kl,
                      sensitivity={n: {str(g): kl for g, kl in row.items()} for n, row in sens.items()})
    layers = get_groups(ctx.qmodel)
    record["bops_per_image"] = total_cost(shapes, layers)
    record["per_tensor_bops_per_image"] = total_cost(shapes, {})
    record["layers"] = layers
    return record


def sets_weight_bits(assignment: dict, qmodel) -> bool:
    """Whether ``assignment`` sets some weight layer's bits (``<layer>@bits`` of a layer that is not
    a Softmax or GELU slot): then ``run`` and ``qat`` record every layer's bits (``layer_bits``)."""
    return bool(set(split_layer_keys(assignment)[1]) - set(qmodel.slot_bits()))


def record_correct(out: Path, name: str, **arrays) -> None:
    """Per-image correctness (packed bits) next to result.json, written atomically."""
    import numpy as np

    from ..io import atomic_path

    with atomic_path(out / name) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)


def _sensitivity(ctx: RunContext, timings: dict[str, float]) -> list[dict]:
    """The sensitivity table: from the cache file if it exists (studies share one per model and
    bits), else measured (and written to the cache)."""
    from ..io import atomic_write_text
    from ..sensitivity import sensitivity_table

    cache = ctx.settings.sensitivity_cache
    if cache and Path(cache).is_file():
        return read_sensitivity_csv(cache)
    rows, sens_timing = sensitivity_table(ctx)
    timings.update(sens_timing)
    if cache:
        atomic_write_text(cache, sensitivity_csv(rows))
    return rows


def _record(ctx: RunContext, strategy: str, assignment, fp, qres, timings) -> dict[str, Any]:
    st, info = ctx.settings, ctx.info
    return {
        "strategy": strategy,
        "model": info.name,
        "checkpoint": info.checkpoint,
        "data": ctx.data.spec,
        "data_embedded": bool(getattr(ctx.data, "embedded", False)),  # the default run's images from the package
        "bits": st.bits,
        "nl_bits": st.nl_bits or st.bits,
        "fine_grid": st.fine_grid,
        "post_ln": st.post_ln,
        "counts": counts(assignment, ctx.slot_ops),
        "slots": ctx.qmodel.count_slots(),
        "top1_fp": round(fp["top1"], 3),
        "top5_fp": round(fp["top5"], 3),
        "top1_quant": round(qres["top1"], 3),
        "top5_quant": round(qres["top5"], 3),
        "eval_images": qres["images"],
        "eval_size": "all" if st.eval_size is None else st.eval_size,
        "calib_images": st.calib_size,
        "seed": st.seed,
        "asqnr_form": st.asqnr_form,
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "wall_time_s": round(timings["wall_s"], 2),
        "device": device_name(ctx.device),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(["mnq-search"] + sys.argv[1:]) if sys.argv and sys.argv[0].endswith("mnq-search") else None,
        "torch": torch.__version__,
        "weights": {k: info.weights_meta.get(k) for k in ("epochs", "top1", "date", "device")} if info.weights_meta else None,
        "config": st.record(),
    }
