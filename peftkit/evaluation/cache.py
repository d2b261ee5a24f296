"""On-disk cache of task results, keyed by what determines them.

The key hashes the model's identity (name, class, dtype, device and a fingerprint of its
weights), the adapter's content (a hash of its tensors and config), the resolved task spec, the
limit, and the size and modification time of every data file read. A hit skips the task. Entries
live in `<peftkit cache>/eval/` as JSON; deleting the folder is always safe.
"""

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.atomic import temp_path
from peftkit.evaluation.spec import TaskResult, TaskSpec
from peftkit.models import cache_dir

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # bump when a task's scoring changes, so old entries stop matching


def default_cache_dir() -> Path:
    return cache_dir() / "eval"


@torch.no_grad()
def weights_fingerprint(model: nn.Module) -> str:
    """A cheap fingerprint of every parameter and buffer: name, shape, dtype and every 101st value.

    Note: hashing all the bytes of a large model takes seconds; a strided sample takes a fraction
    of that and changes with any realistic edit (training or merging touches whole matrices). A
    sum would be cheaper still, but its rounding depends on the thread count.
    """
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        sample = tensor.detach().reshape(-1)[::101].cpu()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update((sample.float() if sample.is_floating_point() else sample).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_identity(model: nn.Module) -> dict[str, str]:
    """What the model is: its registry or hub name, class, dtype, device and weights fingerprint."""
    name = getattr(model, "peftkit_base_name", None) or getattr(model, "name_or_path", None) or ""
    first = next(model.parameters())
    return {"name": str(name), "class": type(model).__name__, "dtype": str(first.dtype).removeprefix("torch."),
            "device": first.device.type, "weights": weights_fingerprint(model)}


@torch.no_grad()
def adapter_identity(model: nn.Module) -> dict[str, str] | None:
    """The adapter's method and a SHA-256 of its saved tensors and config; None without an adapter."""
    cfg = getattr(model, "peftkit_config", None)
    if cfg is None:
        return None
    from peftkit.protocol import adapter_state_dict

    digest = hashlib.sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())
    for key, tensor in sorted(adapter_state_dict(model).items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())  # raw bytes: bf16 has no numpy dtype
    return {"method": cfg.method, "sha256": digest.hexdigest()}


def _file_stamp(path: str) -> dict[str, Any]:
    stat = Path(path).stat()
    return {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def cache_key(model_id: dict, adapter_id: dict | None, spec: TaskSpec, limit: int | None) -> str:
    """The SHA-256 key of one task run."""
    files = [_file_stamp(getattr(spec, f)) for f in spec.data_fields()]
    payload = {"version": CACHE_VERSION, "model": model_id, "adapter": adapter_id,
               "spec": dataclasses.asdict(spec), "limit": limit, "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def load(directory: Path, spec: TaskSpec, key: str) -> tuple[TaskResult, float] | None:
    """(result, seconds it took) for a key, or None on a miss or an unreadable entry."""
    path = directory / f"{spec.name}-{key[:20]}.json"
    try:
        entry = json.loads(path.read_text())
        if entry.get("key") != key:
            return None
        return TaskResult(**entry["result"]), float(entry["seconds"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        logger.warning("ignoring unreadable eval cache entry %s (%s)", path, exc)
        return None


def store(directory: Path, spec: TaskSpec, key: str, result: TaskResult, seconds: float) -> None:
    """Write an entry atomically (temp file, then rename), so readers never see half of one."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{spec.name}-{key[:20]}.json"
    tmp = temp_path(path)
    entry = {"key": key, "seconds": seconds, "result": dataclasses.asdict(result)}
    try:
        tmp.write_text(json.dumps(entry, indent=1, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
