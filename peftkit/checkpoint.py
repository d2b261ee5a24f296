"""Adapter directories in peft's format, so peft and peftkit each load the other's.

    adapter_config.json         peft's schema (peft_type, r, lora_alpha, target_modules, ...)
    adapter_model.safetensors   the adapter's tensors under peft's key names
    README.md                   a model card

Only safetensors and JSON are ever read: no pickle. Writes go to a temp directory that is
renamed into place, so a crash never leaves a half-written adapter, and an existing adapter
is replaced only when the caller says `overwrite=True`.
"""

import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.api import apply_adapter, trainable_parameters
from peftkit.card import render_card
from peftkit.errors import AdapterError
from peftkit.heads import check_modules_to_save, peft_modules_to_save, unmark_heads
from peftkit.models.tasks import PEFT_TASK_TYPES, task_of_model
from peftkit.protocol import PEFT_TYPES, adapter_state_dict, load_adapter_state_dict, method_of

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model: nn.Module, directory: str | Path, *, overwrite: bool = False, data: str | None = None,
                 metrics: dict[str, Any] | None = None, notes: list[str] | None = None) -> Path:
    """Write the model's adapter in peft's format.

    Args:
        model: a model with an adapter.
        directory: where to write; must not hold files unless `overwrite` is set.
        overwrite: replace an existing directory (atomically, after the new one is complete).
        data, metrics, notes: recorded in the model card.

    Returns:
        The directory.

    Raises:
        AdapterError: no adapter, or the directory exists and `overwrite` is not set.
    """
    method = method_of(model)
    cfg = model.peftkit_config
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise AdapterError(f"{directory} already exists and is not empty: choose another directory or pass "
                           f"overwrite=True (--overwrite) to replace it")
    base_name = getattr(model, "peftkit_base_name", None) or getattr(model, "name_or_path", None)
    peft_config = {**method.to_peft_config(cfg, model), "base_model_name_or_path": base_name,
                   "task_type": PEFT_TASK_TYPES[task_of_model(model)], "modules_to_save": peft_modules_to_save(model)}
    card = render_card(base_model=str(base_name), method=method.name, hyperparameters=asdict(cfg),
                       trainable=trainable_parameters(model), data=data, metrics=metrics, notes=notes)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
        save_file(adapter_state_dict(model), tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        (tmp / "README.md").write_text(card)
        _replace_dir(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing target is moved aside first and deleted last."""
    if not target.exists():
        os.rename(new, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex}"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except OSError:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def read_adapter_config(directory: str | Path) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(f"adapter directory {directory} does not exist: check the path")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{directory} has no {CONFIG_NAME}: point to a directory written by "
                           f"save_adapter or peft's save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is not valid JSON ({exc}): restore or re-save the adapter") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterError(f"{path} has no peft_type: it is not a peft adapter config")
    return config


def read_adapter_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    directory = Path(directory)
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterError(f"{directory} holds adapter_model.bin (pickle), which peftkit never reads: re-save "
                               f"it with safe_serialization=True to get {WEIGHTS_NAME}")
        raise AdapterError(f"{directory} has no {WEIGHTS_NAME}: the adapter is incomplete; re-save it")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{path} is truncated or corrupted ({exc}): re-save the adapter or restore the file") from None


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Apply the adapter saved in `directory` (by peftkit or by peft) to a base model.

    Raises:
        AdapterError: a missing or corrupted file, an unsupported adapter type, a model that
            already has an adapter, or an adapter made for another base (names the tensor).
    """
    config = read_adapter_config(directory)
    method = PEFT_TYPES.get(config["peft_type"])
    if method is None:
        raise AdapterError(f"{directory}: peft_type {config['peft_type']!r} is not supported: peftkit loads "
                           f"{', '.join(PEFT_TYPES)}")
    check_modules_to_save(config.get("modules_to_save"), model, str(Path(directory) / CONFIG_NAME))
    cfg = method.from_peft_config(config)
    weights = read_adapter_weights(directory)
    saved_base = config.get("base_model_name_or_path")
    base = getattr(model, "peftkit_base_name", None)
    aliases = {base, getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)}
    if saved_base and base and saved_base not in aliases:
        logger.warning("adapter in %s was saved for %s, loading onto %s", directory, saved_base, base)
    frozen = {name: p.requires_grad for name, p in model.named_parameters()}
    apply_adapter(model, cfg)
    try:
        load_adapter_state_dict(model, weights, source=str(Path(directory) / WEIGHTS_NAME))
    except AdapterError:
        method.unload(model)
        unmark_heads(model)
        model.peftkit_config = None
        for name, p in model.named_parameters():
            p.requires_grad_(frozen.get(name, p.requires_grad))
        raise
    return model
