"""The public adapter API: apply, count, merge and unmerge, whatever the method."""

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.errors import AdapterError, ConfigError
from peftkit.heads import mark_heads, trained_heads, unmark_heads
from peftkit.nf4 import Linear4bit
from peftkit.presets import build_config, load_preset
from peftkit.protocol import METHODS, adapter_parameters, method_of, one_adapter


def resolve_adapter(spec: str | Path | Mapping[str, Any] | Any, **overrides: Any) -> Any:
    """A config dataclass from a preset name, a YAML path, a mapping or a config, plus overrides."""
    if any(isinstance(spec, m.config_class) for m in METHODS.values()):
        if overrides:
            raise ConfigError("overrides apply to preset names, paths and mappings, not to a built config")
        return spec
    values = {**load_preset(spec), **overrides}
    method = values.pop("method", "lora")
    if method not in METHODS:
        raise ConfigError(f"unknown adapter method {method!r}: use one of {', '.join(METHODS)}")
    return build_config(METHODS[method].config_class, values)


def apply_adapter(model: nn.Module, spec: str | Path | Mapping[str, Any] | Any = "lora", *, name: str | None = None,
                  overwrite: bool = False, **overrides: Any) -> nn.Module:
    """Inject an adapter in place, freeze the base, and return the model.

    A classification model's fresh head (`classifier` / `score`) is trained fully too (peft's
    `modules_to_save`); the task comes from the model's class.

    The first adapter is named `default` (or `name`) and trains. An adapter added beside
    others (`name` required) is frozen until `set_adapter` makes it the active one, as in peft.

    Args:
        model: a transformers model (from `load_model` or elsewhere): causal LM, seq-cls,
            token-cls or seq2seq.
        spec: a preset name from `adapters/` (`lora`, `lora-all`, `dora`), a path to a YAML
            preset, a mapping of fields, or a config object.
        name: the adapter's name (see `peftkit.named`).
        overwrite: replace an adapter of that name.
        **overrides: fields that replace the preset's, e.g. `r=16`.

    Returns:
        The same model; only the active adapter's parameters have `requires_grad`.

    Raises:
        ConfigError: unknown preset or key, or an invalid value.
        AdapterError: a second adapter without a new name, one that cannot share the base, or
            targets that match nothing.
    """
    from peftkit import named

    existing = named.names(model)
    if existing and name is None:
        raise AdapterError(f"this model already has an adapter ({', '.join(existing)}): pass name= to add another "
                           f"beside it, or load a fresh base model")
    named.check_new_name(model, name or named.DEFAULT, overwrite)
    cfg = resolve_adapter(spec, **overrides)
    if name in existing:
        named.delete_adapter(model, name)
        existing = named.names(model)
    if existing:
        return named.add_adapter(model, cfg, name)
    METHODS[cfg.method].apply(model, cfg)  # validates targets before it replaces anything
    mark_heads(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in adapter_parameters(model).values():
        param.requires_grad_(True)
    model.train(model.training)  # new modules follow the model's mode (no dropout in eval)
    model.peftkit_config = cfg
    model.peftkit_adapters, model.peftkit_active = {name or named.DEFAULT: cfg}, name or named.DEFAULT
    if not isinstance(METHODS[cfg.method], named.VIRTUAL_METHODS):  # those reject adapter_names themselves
        named.install_rows_hook(model)
    return model


def adapter_config(model: nn.Module, name: str | None = None) -> Any:
    """The config of the model's adapter (`name`: one of several; default: the active one)."""
    method_of(model)
    if name is None:
        return model.peftkit_config
    from peftkit.named import check_name

    check_name(model, name)
    return model.peftkit_adapters[name]


def unload_all(model: nn.Module) -> nn.Module:
    """Remove every adapter (a merged one stays merged), leaving the plain transformers model."""
    from peftkit.named import collapse, remove_rows_hook

    method = method_of(model)
    collapse(model)  # the active adapter's layers stay in the tree; the others' are dropped
    method.unload(model)
    unmark_heads(model)
    remove_rows_hook(model)
    model.peftkit_config = model.peftkit_adapters = model.peftkit_active = None
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once, as in peft.

    A trained classification head counts twice in the total, as in peft, which keeps the frozen
    original beside the trained copy (`modules_to_save`), so "% of base" agrees between the two.

    A 4-bit layer's weight (ours: buffers; bitsandbytes': a packed parameter with a
    `quant_state`) counts as its logical out x in values, so a QLoRA model's total is the base
    model's size, not its packed byte count, whichever implementation quantised it.
    """
    params = list(model.parameters())
    quantized = sum(math.prod(m.weight_shape) for m in model.modules() if isinstance(m, Linear4bit))
    heads = sum(p.numel() for head in trained_heads(model).values() for p in head.parameters()) if getattr(
        model, "peftkit_config", None) is not None else 0
    total = sum(_logical_numel(p) for p in params) + quantized + heads
    return sum(p.numel() for p in params if p.requires_grad), total


def _logical_numel(param: torch.Tensor) -> int:
    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None and getattr(state, "shape", None) else param.numel()


def format_trainable(model: nn.Module) -> str:
    trainable, total = trainable_parameters(model)
    return f"trainable: {trainable:,} / {total:,} ({100 * trainable / total:.2f}%)"


def merge_adapter(model: nn.Module, unload: bool = False) -> nn.Module:
    """Fold the adapter into the base weights.

    Args:
        model: a model with an adapter.
        unload: also remove the adapter modules, returning a plain transformers model that
            no longer needs peftkit (it cannot be unmerged afterwards).

    Raises:
        AdapterError: already merged, or the method cannot merge.
    """
    method = method_of(model)
    if len(getattr(model, "peftkit_adapters", None) or ()) > 1 and any(isinstance(m, Linear4bit) for m in model.modules()):
        raise AdapterError("merging one of several adapters into a 4-bit base is not supported: delete_adapter the "
                           "others first, or load the adapter alone onto a fresh base")
    with one_adapter(model):
        method.merge(model)
    if unload:
        unload_all(model)
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Subtract a merged adapter from the base weights again."""
    with one_adapter(model):
        method_of(model).unmerge(model)
    return model


@contextlib.contextmanager
def merged_for_inference(model: nn.Module) -> Iterator[bool]:
    """Run the block with the adapter folded into the base weights, then restore them bit for bit.

    Inference through merged weights costs what the base model costs: no rank-r matmuls, no
    per-layer dequantisation of a 4-bit base (QLoRA's merge holds a full-precision copy meanwhile).
    The weights the merge replaced are kept and put back afterwards, so nothing drifts by
    rounding (unmerge alone computes W' - BA). A model without a peftkit adapter, one already
    merged, or a method that cannot merge (prefix or prompt tuning) runs as it is.

    Yields:
        whether the adapter was merged for the block.
    """
    cfg = getattr(model, "peftkit_config", None)
    method = METHODS.get(cfg.method) if cfg is not None else None
    if method is None or not method.mergeable or len(getattr(model, "peftkit_adapters", None) or ()) > 1:  # several: run them as they are
        yield False
        return
    originals = {id(p): (p, p.data) for p in model.parameters()}
    try:
        method.merge(model)
    except AdapterError as exc:  # already merged by the caller: leave it so
        logging.getLogger(__name__).debug("not merging for inference: %s", exc)
        yield False
        return
    try:
        yield True
    finally:
        method.unmerge(model)
        for param in model.parameters():
            if id(param) in originals:
                param.data = originals[id(param)][1]

