"""``mnq-search eval``: calibrate and evaluate the model with a given assignment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..calibrate import calibrate, evaluate
from ..context import RunSettings
from ..plan import counts
from ._assignment_run import open_with_assignment, settings_from_assignment
from ._device import device_name
from ._outputs import append_results_csv
from ..preflight import check_output_file


def evaluate_assignment(assignment_file: str, settings: RunSettings, results_file: str | None = None,
                        bits_given: bool = False, fine_grid_given: bool = False) -> dict[str, Any]:
    """Top-1 / top-5 of the model with the file's assignment; one CSV row appended to
    ``results_file`` if given. Model, bits and grid setting come from the file unless given."""
    settings, _ = settings_from_assignment(assignment_file, settings, bits_given, fine_grid_given)
    if results_file:
        check_output_file(results_file, "--results-file")
    ctx, assignment = open_with_assignment(assignment_file, settings)
    calibrate(ctx.qmodel, ctx.calib_batches(), ctx.device)
    res = evaluate(ctx.qmodel, ctx.data.eval_batches(settings.eval_size, settings.batch_size), ctx.device,
                   settings.progress, "quantized eval")
    out = {"model": ctx.info.name, "bits": settings.bits, "fine_grid": settings.fine_grid, "post_ln": settings.post_ln,
           "assignment": str(assignment_file), "counts": counts(assignment, ctx.slot_ops),
           "top1": round(res["top1"], 3), "top5": round(res["top5"], 3), "images": res["images"],
           "seconds": round(res["seconds"], 2), "device": device_name(ctx.device)}
    if results_file:
        append_results_csv(Path(results_file), out)
    return out
