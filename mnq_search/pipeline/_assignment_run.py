"""What ``eval`` and ``qat`` share: settings completed from an assignment file (model, bits and grid
setting as the file says unless given), checked, and the model opened with the file's assignment."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..context import RunContext, RunSettings
from ..io import read_json
from ..plan import load_assignment
from ._build import open_run
from ..preflight import check_input_file


def settings_from_assignment(path: str, settings: RunSettings, bits_given: bool, fine_grid_given: bool
                             ) -> tuple[RunSettings, dict[str, Any]]:
    """``settings`` with the model, bit-width and grid setting of the assignment file at ``path``
    where they were not given on the command line; also the file's metadata."""
    check_input_file(path, "--assignment")
    meta = read_json(path, "assignment file")
    meta = meta if isinstance(meta, dict) else {}
    changes: dict[str, Any] = {}
    if not settings.model and meta.get("model"):
        changes["model"] = meta["model"]
    if not bits_given and meta.get("bits"):
        changes["bits"] = meta["bits"]
        if settings.nl_bits is None and meta.get("nl_bits") and meta["nl_bits"] != meta["bits"]:
            changes["nl_bits"] = meta["nl_bits"]
    if not fine_grid_given:
        changes["fine_grid"] = bool(meta.get("fine_grid"))
    if settings.post_ln == "tensor" and meta.get("post_ln") == "channel":  # the file's unless given
        changes["post_ln"] = "channel"
    return dataclasses.replace(settings, **changes).validate(), meta


def open_with_assignment(path: str, settings: RunSettings, training: bool = False
                         ) -> tuple[RunContext, dict[str, str]]:
    """The run context and the file's assignment, resolved against the model's slots (unknown slots
    or methods are one-line errors, before any forward pass)."""
    ctx = open_run(settings, training=training)
    assignment, _ = load_assignment(path, ctx.slot_ops)
    ctx.qmodel.set_assignment(assignment)
    return ctx, assignment
