"""Opening what a run works on: the float model (with its checkpoint and head), the data, the
converted model and its search space, as one :class:`~mnq_search.context.RunContext`."""

from __future__ import annotations

import torch

from ..context import RunContext, RunSettings
from ..convert import convert_model
from ..data import open_data
from ..errors import UsageError
from ..models import load_model
from ..space import SearchSpace
from ._device import default_device


def prepare(model_name: str | None, checkpoint: str | None, data_spec: str | None, download: bool = False,
            num_classes: int | None = None):
    """(float model, its info, the data source) for a model name, a checkpoint and a data spec."""
    model, info = load_model(model_name, checkpoint, num_classes=num_classes)
    data = open_data(data_spec, model, default=info.data, input_size=info.input_size, download=download)
    return model, info, data


def open_run(settings: RunSettings, training: bool = False, validation: int = 0) -> RunContext:
    """Load the model and the data named by ``settings``, check that the data can serve the run
    (``training``: QAT; ``validation``: images of the validation split a selection scores on), and
    convert the model; one-line errors for anything that does not fit, before any forward pass."""
    device = settings.device or default_device()
    torch.manual_seed(settings.seed)
    model, info, data = prepare(settings.model, settings.checkpoint, settings.data, settings.download,
                                settings.num_classes)
    data.require(settings.eval_size, settings.calib_size, training=training, validation=validation)
    if data.num_classes > model.num_classes:
        raise UsageError(f"the data set has {data.num_classes} classes but the model's classifier has "
                         f"{model.num_classes} outputs: pass --num-classes or a matching checkpoint")
    model = model.to(device)
    caps = None
    if settings.post_ln == "channel":  # the float model itself is reparameterised (the same function)
        from ..reparam import reparam_post_ln

        model, rec = reparam_post_ln(model, list(data.calib_batches(settings.calib_size, settings.batch_size)),
                                     settings.bits)
        caps = rec.caps
    qmodel = convert_model(model, settings.bits, fine_grid=settings.fine_grid, nl_bits=settings.nl_bits).to(device)
    if caps:
        from ..reparam import apply_caps

        apply_caps(qmodel, caps)
    return RunContext(settings=settings, slot_ops=qmodel.slot_ops(), model=model, qmodel=qmodel, data=data,
                      device=device, info=info, space=SearchSpace.from_model(qmodel, kinds=_kinds(settings), families=settings.families,
                                                   bits=settings.search_bits,
                                                   groups=settings.search_groups, nl_bits=settings.search_nl_bits))


def _kinds(settings: RunSettings) -> tuple[str, ...]:
    return (("method", "param") + (("bits",) if settings.joint_bits else ())
            + (("nl_bits",) if settings.joint_nl_bits else ()) + (("groups",) if settings.joint_groups else ()))
