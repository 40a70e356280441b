"""Checks that run before any model is built or evaluated: every output folder, storage, file and
option a command names, each a one-line UsageError (exit code 2) with nothing written.

This module imports neither torch nor the model code: the CLI runs these checks first, before the
heavy imports (:func:`check_output_dir`, :func:`check_storage`, :func:`check_input_file`); the
pipeline then opens the model, the checkpoint and the data (each a one-line error when it cannot),
and checks the assignment file against the model's slots, all before the first forward pass.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError


def check_output_dir(path: str | Path, flag: str = "--out") -> None:
    """``path`` can be created (or is already a folder) and written into, without creating anything:
    no part of it is an existing file, and the deepest existing folder is writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {path} exists and is not a folder")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{flag} {path}: {probe} is a file, so the folder cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: no permission to write in {probe}")


def check_output_file(path: str | Path, flag: str) -> None:
    """A file that will be written: its folder passes :func:`check_output_dir`, it is not a folder."""
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a folder, not a file")
    check_output_dir(p.parent if str(p.parent) else ".", flag)


def check_input_file(path: str | Path, flag: str) -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path} not found")
    if not p.is_file():
        raise UsageError(f"{flag} {path} is not a file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"{flag} {path} cannot be read")


def check_checkpoint(path: str | Path, flag: str = "--checkpoint") -> None:
    """The checkpoint is a readable file in a format the loader takes, sniffed without torch: a
    safetensors file's header (8-byte length, then a JSON object that fits in the file and whose
    tensors' byte ranges do too), or torch.save's zip or legacy pickle container. The tensors
    themselves are read later, by the pipeline (:func:`mnq_search.io.load_state_dict`)."""
    import json
    import struct

    check_input_file(path, flag)
    p = Path(path)
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if p.suffix == ".safetensors":
            problem = None
            if len(head) < 8:
                problem = "shorter than a safetensors header"
            else:
                (n,) = struct.unpack("<Q", head)
                if n == 0 or n > size - 8:
                    problem = f"header length {n} does not fit in the file ({size} bytes)"
                else:
                    try:
                        header = json.loads(fh.read(n))
                    except (UnicodeDecodeError, ValueError):
                        header = None
                    if not isinstance(header, dict):
                        problem = "header is not a JSON object"
                    else:
                        ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items()
                                if k != "__metadata__" and isinstance(v, dict)]
                        if ends and max(ends) > size - 8 - n:
                            problem = "tensor data extends past the end of the file"
            if problem:
                raise UsageError(f"checkpoint {path} is corrupt or not safetensors: {problem}")
            return
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise UsageError(f"checkpoint {path} is corrupt or not a torch checkpoint: neither torch.save's zip "
                         "nor pickle format (or give a .safetensors file)")


def checkpoint_slots(path: str | Path) -> dict[str, str] | None:
    """The non-linear slots a timm ViT / Swin converts to, read from a safetensors checkpoint's tensor
    names without torch (slot -> op): ``<attn>.softmax`` for every ``<attn>.qkv.weight``,
    ``<mlp>.act`` for every ``<mlp>.fc1.weight``, and every 1-D ``.weight`` of a module named
    ``norm*``, ``fc_norm`` or ``norm_pre`` (a LayerNorm). None when the file is not safetensors."""
    import json
    import re
    import struct

    p = Path(path)
    if p.suffix != ".safetensors" or not p.is_file():
        return None
    with open(p, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    slots: dict[str, str] = {}
    norm = re.compile(r"(^|\.)(norm\d*|fc_norm|norm_pre)$")
    for key, info in header.items():
        if key == "__metadata__" or not isinstance(info, dict):
            continue
        module, _, leaf = key.rpartition(".")
        if key.endswith(".qkv.weight"):
            slots[module[: -len(".qkv")] + ".softmax"] = "softmax"
        elif key.endswith(".fc1.weight"):
            slots[module[: -len(".fc1")] + ".act"] = "gelu"
        elif leaf == "weight" and norm.search(module) and len(info.get("shape", [])) == 1:
            slots[module] = "layernorm"
    return slots


def check_assignment_slots(assignment_path: str | Path, checkpoint: str | Path | None) -> None:
    """Before torch loads: every slot an assignment file names exists in the checkpoint's model (only
    when the checkpoint is a safetensors file, whose tensor names tell the slots; the full check
    runs again on the converted model)."""
    import difflib
    import json

    slots = checkpoint_slots(checkpoint) if checkpoint else None
    if not slots:
        return
    try:
        data = json.loads(Path(assignment_path).read_text())
    except (OSError, ValueError):
        return  # the loader says what is wrong with the file
    if not isinstance(data, dict):
        return
    named = data.get("slots", {}) if ("slots" in data or "default" in data) else data
    params = data.get("params", {}) if isinstance(data.get("params"), dict) else {}
    if not isinstance(named, dict):
        return
    for name in list(named) + [k.partition("#")[0] for k in params]:
        if name not in slots:
            close = difflib.get_close_matches(name, list(slots), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"unknown slot {name!r}{hint}; the model has {len(slots)} slots, "
                             f"e.g. {', '.join(list(slots)[:3])}")


def parse_data_spec(spec: str) -> tuple[str, str]:
    """``(kind, path)`` of a ``--data`` spec (``fmnist``, ``fmnist:PATH``, ``imagefolder:PATH``)."""
    kind, _, path = spec.partition(":")
    if kind not in ("fmnist", "imagefolder"):
        raise UsageError(f"unknown data spec {spec!r}; use fmnist, fmnist:PATH or imagefolder:PATH")
    if kind == "imagefolder" and not path:
        raise UsageError("--data imagefolder:PATH needs a path")
    return kind, path


def check_data_spec(spec: str | None, download: bool = False) -> None:
    """The form of ``--data`` and, for a folder it names, that the folder exists (the images are read
    later; Fashion-MNIST's search order is the data module's)."""
    if not spec:
        return
    kind, path = parse_data_spec(spec)
    if kind == "imagefolder" and not Path(path).is_dir():
        raise UsageError(f"image folder not found: {path}")
    if kind == "fmnist" and path and not download and not Path(path).exists():
        raise UsageError(f"Fashion-MNIST not found in {path}: give the folder of its idx files, or "
                         "--download to fetch it there with torchvision")


def check_storage(url: str, connect_timeout_s: int = 3) -> None:
    """The storage URL parses; for a database its driver imports and a server answers within
    ``connect_timeout_s``; for SQLite and journal files the file's folder can be written. Nothing is
    created."""
    from .search import mask_url, parse_storage

    kind, where = parse_storage(url)
    if kind == "journal":
        check_output_file(where, "--storage journal file")
        return
    import sqlalchemy

    parsed = sqlalchemy.engine.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            check_output_file(parsed.database, "--storage SQLite file")
        return
    args = {"connect_timeout": connect_timeout_s} if parsed.get_backend_name() == "postgresql" else {}
    try:
        engine = sqlalchemy.create_engine(parsed, connect_args=args)
    except ImportError as exc:
        raise UsageError(f"cannot use storage {mask_url(url)}: {exc} (PostgreSQL needs psycopg2-binary: "
                         "pip install psycopg2-binary)") from None
    except sqlalchemy.exc.ArgumentError as exc:
        raise UsageError(f"bad storage URL {mask_url(url)}: {exc}") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", exc)).strip().splitlines()[0][:200]
        raise UsageError(f"cannot connect to storage {mask_url(url)}: {first}") from None
    finally:
        engine.dispose()
