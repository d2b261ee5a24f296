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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.api import apply_adapter, trainable_parameters
from peftkit.atomic import staged
from peftkit.card import render_card
from peftkit.errors import AdapterError
from peftkit.heads import check_modules_to_save, peft_modules_to_save
from peftkit.models.tasks import PEFT_TASK_TYPES, task_of_model
from peftkit.protocol import (
    PEFT_TYPES,
    adapter_parameters,
    adapter_state_dict,
    load_adapter_state_dict,
    method_of,
    one_adapter,
)

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model: nn.Module, directory: str | Path, *, name: str | None = None, overwrite: bool = False,
                 data: str | None = None, metrics: dict[str, Any] | None = None, notes: list[str] | None = None) -> Path:
    """Write the model's adapter in peft's format.

    One adapter (the model's only one, or `name`) goes to `directory` itself, where
    `PeftModel.from_pretrained(base, directory)` and `load_adapter` find it. A model with several
    adapters and no `name` is written in peft's multi-adapter layout: `default` in `directory`,
    every other adapter in `directory/<name>/`.

    Args:
        model: a model with an adapter.
        directory: where to write; must not hold files unless `overwrite` is set.
        name: one of several named adapters to write alone.
        overwrite: replace an existing directory (atomically, after the new one is complete).
        data, metrics, notes: recorded in the model card.

    Returns:
        The directory.

    Raises:
        AdapterError: no adapter, an unknown name, or the directory exists and `overwrite` is not set.
    """
    from peftkit.named import check_name, names

    method_of(model)
    if name is not None:
        check_name(model, name)
    selected = [name] if name is not None else names(model)
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())) and not overwrite:
        raise AdapterError(f"{directory} already exists and is not empty: choose another directory or pass "
                           f"overwrite=True (--overwrite) to replace it")
    with staged(directory) as tmp:
        for adapter in selected:
            where = tmp if len(selected) == 1 or adapter == "default" else tmp / adapter
            where.mkdir(exist_ok=True)
            with one_adapter(model, adapter):
                _write(model, where, data, metrics, notes)
    return directory


def _write(model: nn.Module, where: Path, data: str | None, metrics: dict[str, Any] | None, notes: list[str] | None) -> None:
    """The model's one adapter (the block's view) as peft's three files."""
    method, cfg = method_of(model), model.peftkit_config
    base_name = getattr(model, "peftkit_base_name", None) or getattr(model, "name_or_path", None)
    peft_config = {**method.to_peft_config(cfg, model), "base_model_name_or_path": base_name,
                   "task_type": PEFT_TASK_TYPES[task_of_model(model)], "modules_to_save": peft_modules_to_save(model)}
    trainable, total = trainable_parameters(model)
    size = sum(p.numel() for p in adapter_parameters(model).values())  # a frozen (inactive) adapter's too
    card = render_card(base_model=str(base_name), method=method.name, hyperparameters=asdict(cfg),
                       trainable=(max(trainable, size), total), data=data, metrics=metrics, notes=notes)
    (where / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    save_file(adapter_state_dict(model), where / WEIGHTS_NAME, metadata={"format": "pt"})
    (where / "README.md").write_text(card)


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


def adapter_subdirectories(directory: Path) -> dict[str, Path]:
    """peft's multi-adapter layout: each subfolder holding an adapter_config.json, by adapter name."""
    if not directory.is_dir():
        return {}
    return {sub.name: sub for sub in sorted(directory.iterdir()) if sub.is_dir() and (sub / CONFIG_NAME).is_file()}


def load_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> nn.Module:
    """Apply the adapter saved in `directory` (by peftkit or by peft) to a base model.

    A directory in peft's multi-adapter layout (`default` at the top, others in subfolders by
    name) loads whole, each adapter under its name, unless `name` picks one of them. A model
    that has adapters already gains this one beside them, under `name`.

    Raises:
        AdapterError: a missing or corrupted file, an unsupported adapter type, a name that
            exists, or an adapter made for another base (names the tensor).
    """
    from peftkit.named import DEFAULT

    directory = Path(directory)
    subdirs = adapter_subdirectories(directory)
    if not subdirs:
        return _load_one(model, directory, name)
    entries = {DEFAULT: directory} if (directory / CONFIG_NAME).is_file() else {}
    entries.update(subdirs)
    if name is not None:
        if name not in entries:
            raise AdapterError(f"{directory} holds the adapters {', '.join(entries)}, not {name!r}: pick one of them")
        entries = {name: entries[name]}
    for adapter, path in entries.items():
        _load_one(model, path, adapter)
    return model


def _load_one(model: nn.Module, directory: Path, name: str | None) -> nn.Module:
    from peftkit.api import unload_all
    from peftkit.named import delete_adapter, names

    config = read_adapter_config(directory)
    method = PEFT_TYPES.get(config["peft_type"])
    if method is None:
        raise AdapterError(f"{directory}: peft_type {config['peft_type']!r} is not supported: peftkit loads "
                           f"{', '.join(PEFT_TYPES)}")
    check_modules_to_save(config.get("modules_to_save"), model, str(directory / CONFIG_NAME))
    cfg = method.from_peft_config(config)
    weights = read_adapter_weights(directory)
    saved_base = config.get("base_model_name_or_path")
    base = getattr(model, "peftkit_base_name", None)
    aliases = {base, getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None)}
    if saved_base and base and saved_base not in aliases:
        logger.warning("adapter in %s was saved for %s, loading onto %s", directory, saved_base, base)
    first = not names(model)
    frozen = {key: p.requires_grad for key, p in model.named_parameters()}
    apply_adapter(model, cfg, name=name)
    added = names(model)[-1]
    try:
        load_adapter_state_dict(model, weights, source=str(directory / WEIGHTS_NAME), name=added)
    except AdapterError:
        if not first:
            delete_adapter(model, added)
            raise
        unload_all(model)
        for key, p in model.named_parameters():
            p.requires_grad_(frozen.get(key, p.requires_grad))
        raise
    return model
