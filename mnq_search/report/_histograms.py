"""The paper's Figure 2: histograms of a slot's float output (Output X) against each method's
quantized-then-dequantized output (Output QX), with that slot's SQNR diff in each title.

The tensors are not in a run folder: :func:`collect_outputs` re-runs the model that the run's
``result.json`` describes (model, checkpoint, data, bits, fine grid, calibration size, seed): it
calibrates one copy per method as the sensitivity pass does
(:func:`mnq_search.sensitivity.build_method_models`), then records the chosen slots' outputs
(:func:`mnq_search.sensitivity.recording`) on a few calibration images, for the float model and
for each method.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..errors import UsageError
from ._style import method_title, new_figure

DEFAULT_SLOT_COUNT = 4
MAX_VALUES = 400_000  # per histogram: a seeded sample when a slot's output is larger
BINS = 60
FLOAT_KEY = "float"


def disagreement(rows: Sequence[dict]) -> dict[str, float]:
    """Per slot, the spread (max - min) of SQNR diff across its methods."""
    diffs: dict[str, list[float]] = {}
    for r in rows:
        diffs.setdefault(str(r["slot"]), []).append(float(r["sqnr_diff"]))
    return {s: max(d) - min(d) for s, d in diffs.items()}


def pick_slots(rows: Sequence[dict], count: int = DEFAULT_SLOT_COUNT) -> list[str]:
    """The ``count`` slots where the methods disagree most (largest SQNR-diff spread), in forward order.

    >>> rows = [dict(slot="a", sqnr_diff=0.0), dict(slot="a", sqnr_diff=9.0),
    ...         dict(slot="b", sqnr_diff=1.0), dict(slot="b", sqnr_diff=2.0)]
    >>> pick_slots(rows, 1)
    ['a']
    """
    spread = disagreement(rows)
    order = list(spread)
    top = sorted(order, key=lambda s: (-spread[s], order.index(s)))[:count]
    return [s for s in order if s in top]


def check_slots(requested: Sequence[str], known: Sequence[str]) -> None:
    """A one-line UsageError naming the closest slot when ``requested`` names an unknown one."""
    for name in requested:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown slot {name!r} in --slots{hint}; there are {len(known)} slots, "
                             f"e.g. {', '.join(list(known)[:3])}")


def _run_settings(result: Mapping[str, Any]) -> dict[str, Any]:
    cfg = result.get("config") or {}

    def get(key: str, default: Any = None) -> Any:
        return cfg[key] if cfg.get(key) is not None else result.get(key, default)

    return dict(model=get("model"), checkpoint=get("checkpoint"), data=get("data"), bits=int(get("bits", 8)),
                fine_grid=bool(get("fine_grid", False)),
                calib_size=int(cfg.get("calib_size") or result.get("calib_images") or 128),
                batch_size=int(cfg.get("sens_batch_size") or 32), seed=int(get("seed", 0)))


def load_run_model(result: Mapping[str, Any], device: str):
    """The run's float model converted as the run did (bits, fine grid), and its data; UsageError
    when either cannot be loaded."""
    from ..convert import convert_model
    from ..pipeline import prepare

    s = _run_settings(result)
    try:
        model, _, data = prepare(s["model"], s["checkpoint"], s["data"])
        qmodel = convert_model(model, s["bits"], fine_grid=s["fine_grid"]).to(device)
    except (OSError, RuntimeError) as exc:
        raise UsageError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return qmodel, data, s


def collect_outputs(result: Mapping[str, Any], slots: Sequence[str], images: int, device: str = "cpu",
                    progress: bool = False) -> dict[str, dict[str, np.ndarray]]:
    """``{slot: {"float": values, method: values}}``: the slots' outputs on ``images`` calibration
    images, float and for each method valid for the slot's op (the same sampled positions in each).

    Raises:
        UsageError: the model, its checkpoint or its data cannot be loaded.
    """
    from ..sensitivity import build_method_models
    from ..slot import methods_for

    qmodel, data, s = load_run_model(result, device)
    slot_ops = qmodel.slot_ops()
    check_slots(slots, list(slot_ops))
    methods = list(dict.fromkeys(m for op in {slot_ops[x] for x in slots} for m in methods_for(op)))
    calib = lambda: data.calib_batches(s["calib_size"], s["batch_size"])  # noqa: E731
    models = build_method_models(qmodel, methods, calib, device, progress)
    shown = lambda: data.calib_batches(images, s["batch_size"])  # noqa: E731
    recorded = {FLOAT_KEY: _record(qmodel.set_quant(False), slots, shown(), device)}
    for method, model in models.items():
        recorded[method] = _record(model, [x for x in slots if method in methods_for(slot_ops[x])], shown(), device)
    return {x: _sample({k: v[x] for k, v in recorded.items() if x in v}) for x in slots}


@torch.inference_mode()
def _record(model, slots: Sequence[str], batches, device: str) -> dict[str, torch.Tensor]:
    from ..sensitivity import recording

    got: dict[str, list[torch.Tensor]] = {x: [] for x in slots}

    def keep(name: str, x_in: torch.Tensor, y: torch.Tensor) -> None:
        if name in got:
            got[name].append(y.detach().float().reshape(-1).cpu())

    model.eval()
    with recording(model, keep):
        for x, _ in batches:
            model(x.to(device))
    return {name: torch.cat(v) for name, v in got.items() if v}


def _sample(values: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    n = min(v.numel() for v in values.values())
    if n > MAX_VALUES:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:MAX_VALUES]
        return {k: v[:n][idx].numpy() for k, v in values.items()}
    return {k: v[:n].numpy() for k, v in values.items()}


def plot_histograms(outputs: Mapping[str, Mapping[str, np.ndarray]], diffs: Mapping[tuple[str, str], float],
                    labels: Mapping[str, str], chosen: Mapping[str, str], title: str) -> Figure:
    """Figure 2: one row per slot, one panel per method: Output X (float, blue) against Output QX
    (the method's, red), log-count axis, titled with the slot's label and the method's SQNR diff.

    Args:
        outputs: from :func:`collect_outputs`.
        diffs: ``{(slot, method): SQNR diff}`` from ``sensitivity.csv``.
        labels: paper-style slot labels (``22.softmax``).
        chosen: the run's assignment; the chosen method's title says so.
        title: the figure's title.
    """
    cols = max(len(v) - 1 for v in outputs.values())
    fig = new_figure(3.6 * cols, 2.7 * len(outputs) + 0.4)
    fig.suptitle(title)
    grid = fig.subplots(len(outputs), cols, squeeze=False)
    for row, (slot, values) in zip(grid, outputs.items()):
        methods = [m for m in values if m != FLOAT_KEY]
        for ax, method in zip(row, methods):
            _draw_pair(ax, values[FLOAT_KEY], values[method])
            mark = " (chosen)" if chosen.get(slot) == method else ""
            diff = diffs.get((slot, method))
            diff_text = f"SQNR diff = {diff:.2f} dB" if diff is not None else "SQNR diff n/a"
            ax.set_title(f"{labels.get(slot, slot)} {method_title(method)}{mark}\n{diff_text}",
                         fontsize=9)
        for ax in row[len(methods):]:
            ax.set_axis_off()
    grid[0][0].legend(fontsize=7, loc="upper right")
    return fig


def _draw_pair(ax, x: np.ndarray, q: np.ndarray) -> None:
    lo, hi = float(min(x.min(), q.min())), float(max(x.max(), q.max()))
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, BINS + 1)
    ax.hist(x, edges, histtype="stepfilled", log=True, color="tab:blue", alpha=0.5, label="Output X")
    ax.hist(q, edges, histtype="stepfilled", log=True, color="tab:red", alpha=0.5, label="Output QX")
    ax.tick_params(labelsize=7)
