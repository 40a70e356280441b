"""Layer-wise sensitivity of the non-linear slots (paper section 3.2.1-3.2.3, spec section 6).

For each method family, a copy of the quantized model with that family in every slot (where a
family has no method for an op, its declared stand-in: the FQ-ViT model uses I-BERT's GELU, the
choice ``uniform:fqvit`` makes, and no FQ-ViT GELU rows are reported) is calibrated on the
calibration images. Then, batch by batch,
the float model runs once with a recorder on every slot, and each method's model runs once
comparing every slot's input and output with the float model's at the same place: all slots are
measured in one forward pass per method, not one pass per slot.

ASQNR (dB) of a slot's tensors over N samples, ``x_i`` float and ``q_i`` quantized (dequantized):

- ``amplitude`` (default, the authors' code as described publicly; a true dB figure):
  ``20 log10( mean_i ||x_i|| / ||x_i - q_i|| )``;
- ``eq10`` (the paper's Eq. 10 as printed): ``20 log10( mean_i E[x_i^2] / E[(x_i - q_i)^2] )``.

SQNR diff = ASQNR(output) - ASQNR(input) (Eq. 11): how much signal-to-noise a layer loses (< 0) or
gains (> 0) between the noise it receives and the noise it passes on.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .calibrate import calibrate
from .convert import QuantModel
from .errors import UsageError
from .integer import power_sums
from .methods import uniform_assignment
from .slot import NonLinearSlot, methods_for

ASQNR_FORMS = ("amplitude", "eq10")

@dataclass
class _Acc:
    """Per-sample sums for one (method, slot, side)."""

    amp: float = 0.0
    power: float = 0.0
    n: int = 0

    def add(self, x: torch.Tensor, q: torch.Tensor) -> None:
        sxx, sdd = power_sums(x, q)  # float64 per sample, x - q taken in float32
        sig, noise = sxx.sqrt(), sdd.sqrt()
        px, pd = sxx / x.shape[1], sdd / x.shape[1]
        tiny = 1e-30
        self.amp += float((sig / (noise + 1e-12 * sig + tiny)).sum())
        self.power += float((px / (pd + 1e-24 * px + tiny)).sum())
        self.n += x.shape[0]

    def asqnr(self, form: str) -> float:
        value = self.amp / self.n if form == "amplitude" else self.power / self.n
        return 20.0 * math.log10(max(value, 1e-30))


@contextmanager
def recording(model: QuantModel, fn):
    slots = [m for m in model.modules() if isinstance(m, NonLinearSlot)]
    for s in slots:
        s.recorder = fn
    try:
        yield
    finally:
        for s in slots:
            s.recorder = None


def build_method_models(qmodel: QuantModel, methods: Iterable[str], calib_batches_fn, device,
                        progress: bool = False) -> dict[str, QuantModel]:
    """One calibrated copy of ``qmodel`` per family (its uniform assignment, stand-ins included)."""
    out = {}
    for method in methods:
        # the copies share qmodel's parameters (nothing here changes them): a copy of the modules
        # and buffers only, 6x faster than a full deep copy
        m = copy.deepcopy(qmodel, memo={id(p): p for p in qmodel.parameters()})
        m.set_quant(True)
        m.set_assignment(uniform_assignment(method, m.slot_ops()))
        calibrate(m, calib_batches_fn(), device, progress=progress)
        out[method] = m
    return out


@torch.inference_mode()
def measure_slots(float_model: QuantModel, models: Mapping[str, QuantModel],
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device="cpu", form: str = "amplitude",
                  valid=None, progress: bool = False) -> list[dict]:
    """Per-slot ASQNR of each labelled model's slot inputs and outputs against ``float_model``
    (quantization off), all slots in one forward pass per model. ``valid(label, op)`` says which
    (model, slot) pairs to measure (default: all). Rows: slot, op, label, asqnr_in, asqnr_out, sqnr_diff."""
    if form not in ASQNR_FORMS:
        raise UsageError(f"unknown ASQNR form {form!r}; choose from: {', '.join(ASQNR_FORMS)}")
    valid = valid or (lambda label, op: True)
    slot_ops = float_model.slot_ops()
    acc: dict[tuple[str, str, str], _Acc] = {}
    float_model.eval()
    for m in models.values():
        m.eval()
    for x, _ in tqdm(batches, desc="sensitivity", disable=not progress, leave=False):
        x = x.to(device)
        b = x.shape[0]
        ref: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(name, x_in, y):
            ref[name] = (x_in.reshape(b, -1).float(), y.reshape(b, -1).float())

        with recording(float_model, keep):
            float_model(x)
        for label, model in models.items():
            def compare(name, x_in, y, label=label):
                if not valid(label, slot_ops[name]):
                    return
                fx, fy = ref[name]
                acc.setdefault((label, name, "in"), _Acc()).add(fx, x_in.reshape(b, -1).float())
                acc.setdefault((label, name, "out"), _Acc()).add(fy, y.reshape(b, -1).float())

            with recording(model, compare):
                model(x)
    if not acc:
        raise UsageError("calibration data is empty")
    rows = []
    for name, op in slot_ops.items():
        for label in models:
            if (label, name, "in") not in acc:
                continue
            a_in = acc[(label, name, "in")].asqnr(form)
            a_out = acc[(label, name, "out")].asqnr(form)
            rows.append(dict(slot=name, op=op, label=label, asqnr_in=round(a_in, 4),
                             asqnr_out=round(a_out, 4), sqnr_diff=round(a_out - a_in, 4)))
    return rows


def measure_sensitivity(float_model: QuantModel, method_models: Mapping[str, QuantModel],
                        batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device="cpu",
                        form: str = "amplitude", progress: bool = False) -> list[dict]:
    """Rows ``slot, op, method, asqnr_in, asqnr_out, sqnr_diff`` for every slot and every method
    valid for the slot's op. ``float_model`` must have quantization off (``set_quant(False)``)."""
    rows = measure_slots(float_model, method_models, batches, device, form,
                         valid=lambda method, op: method in methods_for(op), progress=progress)
    return [dict(slot=r["slot"], op=r["op"], method=r["label"], asqnr_in=r["asqnr_in"], asqnr_out=r["asqnr_out"],
                 sqnr_diff=r["sqnr_diff"]) for r in rows]


def sensitivity_table(ctx) -> tuple[list[dict], dict[str, float]]:
    """The sensitivity table of a run (:class:`~mnq_search.context.RunContext`): one calibrated
    copy of the converted model per registered family, every slot measured against the float
    model on the run's calibration images (batches of ``sens_batch_size``). Also times one float
    pass over the same images, the reference of the sensitivity-time ratio in BENCHMARKS.md."""
    import time

    st = ctx.settings
    t = time.perf_counter()
    calib = lambda: ctx.data.calib_batches(st.calib_size, st.sens_batch_size)  # noqa: E731
    models = build_method_models(ctx.qmodel, list(ctx.families), calib, ctx.device, st.progress)
    float_ref = ctx.qmodel.set_quant(False)
    try:
        rows = measure_sensitivity(float_ref, models, calib(), ctx.device, st.asqnr_form, st.progress)
    finally:
        ctx.qmodel.set_quant(True)
    sens_s = time.perf_counter() - t
    t = time.perf_counter()
    with torch.inference_mode():
        for x, _ in calib():
            ctx.model(x.to(ctx.device))
    float_s = time.perf_counter() - t
    return rows, {"sensitivity_s": sens_s, "float_pass_calib_s": float_s,
                  "sensitivity_over_float_pass": sens_s / max(float_s, 1e-9)}
