"""Files that are never half-written: every output goes to a temporary file, then is renamed.

Also the checkpoint format: fp16 safetensors for shipped weights, and a loader that accepts
safetensors or a torch ``.pt``/``.pth`` state dict (plain, or under ``model``/``state_dict``) and
turns any unreadable file into a one-line UsageError.
"""

from __future__ import annotations

import csv
import io as _io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import UsageError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def csv_text(fields, rows) -> str:
    """CSV text: a header of ``fields``, then one line per row (a mapping; missing keys empty,
    keys not in ``fields`` left out)."""
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    w.writerows({k: r.get(k) for k in fields} for r in rows)
    return buf.getvalue()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {path} is not valid JSON: {exc}") from None


def save_weights(model: torch.nn.Module, path: str | Path, metadata: dict[str, str] | None = None,
                 dtype: torch.dtype = torch.float16) -> None:
    """Save a model's state dict as safetensors, floating tensors cast to ``dtype``."""
    from safetensors.torch import save_file

    state = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous().cpu()
             for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def load_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read weights from safetensors or a torch checkpoint; returns (state_dict, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                state = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises several types for a damaged header or body
            raise UsageError(f"checkpoint {path} is corrupt or not safetensors: {exc}") from None
        return state, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle/zip/runtime errors for damaged files
        raise UsageError(f"checkpoint {path} is corrupt or not a torch checkpoint: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"checkpoint {path} holds no state dict of tensors")
    return obj, {}


def load_weights_into(model: torch.nn.Module, path: str | Path,
                      loaded: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None) -> dict[str, str]:
    """Load a checkpoint into ``model`` (cast to the model's dtypes); mismatched keys or shapes are a
    one-line UsageError naming the first. ``loaded``: the file's (state, metadata), already read."""
    state, meta = loaded if loaded is not None else load_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise UsageError(f"checkpoint {path} does not fit the model: {len(missing)} missing keys "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    bad = [k for k in own if own[k].shape != state[k].shape]
    if bad:
        raise UsageError(f"checkpoint {path} does not fit the model: shape of {bad[0]} is "
                         f"{tuple(state[bad[0]].shape)}, model has {tuple(own[bad[0]].shape)}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return meta
