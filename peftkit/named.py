"""Several adapters on one base by name: add, choose, disable, delete, list, and mixed-adapter batches.

A model's adapters live in `model.peftkit_adapters` (name -> config, in the order they were
added) and the one that runs and trains is `model.peftkit_active`; `model.peftkit_config` is
the active adapter's config, as it always was. The first adapter is `default`. With two or
more adapters every adapted layer is an `AdapterSlots` container (see `peftkit.slots`); with
one there are none, so a single-adapter model is exactly what it was before names existed.

Layer methods (LoRA and its variants, IA3, VeRA, LoHa, LoKr, HiRA, AdaLoRA) can share a base,
in any mix: one layer runs one adapter at a time. Prefix and prompt tuning change the model's
inputs, not its layers, and a trained classification head is one per model: those keep one
adapter per model (a one-line error otherwise).
"""

import contextlib
import logging
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from peftkit.errors import AdapterError
from peftkit.heads import trained_heads
from peftkit.methods import METHODS, method_label
from peftkit.methods.lora import BASE_INITS
from peftkit.methods.prefix import PrefixMethod
from peftkit.methods.prompt import PromptMethod
from peftkit.methods.virtual_tokens import VirtualTokens
from peftkit.protocol import adapter_parameters
from peftkit.slots import BASE, AdapterSlots, containers, rows, view
from peftkit.targets import replace_module

logger = logging.getLogger(__name__)

DEFAULT = "default"
VIRTUAL_METHODS = (PrefixMethod, PromptMethod)  # methods that change the inputs, not the layers


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter on a model, as `adapters(model)` lists it."""

    name: str
    method: str  # lora, dora, qlora, ia3, ...
    parameters: int  # tensors' elements, the adapter's size
    active: bool


def names(model: nn.Module) -> list[str]:
    """The model's adapter names, in the order they were added (empty for a bare model)."""
    return list(getattr(model, "peftkit_adapters", None) or {})


def adapters(model: nn.Module) -> dict[str, AdapterInfo]:
    """Each adapter on the model by name, with its method, size and whether it is active."""
    active = getattr(model, "peftkit_active", None)
    infos = {}
    for name, cfg in (getattr(model, "peftkit_adapters", None) or {}).items():
        with view(model, name):
            size = sum(p.numel() for p in adapter_parameters(model).values())
        infos[name] = AdapterInfo(name, method_label(cfg), size, name == active)
    return infos


def check_name(model: nn.Module, name: str) -> None:
    """An existing adapter's name, or a one-line error listing the model's adapters."""
    known = names(model)
    if name not in known:
        listed = ", ".join(known) if known else "none: apply or load one first"
        raise AdapterError(f"this model has no adapter named {name!r}; its adapters: {listed}")


def check_new_name(model: nn.Module, name: Any, overwrite: bool = False) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE:
        raise AdapterError(f"adapter name must be a non-empty string without '.', other than {BASE!r}, got {name!r}")
    if name in names(model) and not overwrite:
        raise AdapterError(f"this model already has an adapter named {name!r}: choose another name, or pass "
                           f"overwrite=True (--overwrite) to replace it")


def layers_of(model: nn.Module) -> dict[str, nn.Module]:
    """The adapted layers in the tree (each over its base), by path."""
    return {path: m for path, m in model.named_modules()
            if hasattr(m, "adapter_parameter_names") and isinstance(getattr(m, "base", None), nn.Module)}


def merged(model: nn.Module) -> bool:
    return any(getattr(m, "merged", False) for m in model.modules())


def _check_shareable(model: nn.Module, cfg: Any, name: str) -> None:
    """A second adapter can join the first one's base, or a one-line error says why not."""
    first = next(iter(model.peftkit_adapters.values()))
    for label, c in (("this model's adapter", first), (f"adapter {name!r}", cfg)):
        if isinstance(METHODS[c.method], VIRTUAL_METHODS):
            raise AdapterError(f"{label} is {c.method} tuning, which changes the model's inputs: it cannot share a "
                               f"model with another adapter; load a fresh base model for it")
        if getattr(c, "init", None) in (*BASE_INITS, "loftq"):
            raise AdapterError(f"{label} starts from {c.init}, which changes the base weights: load a fresh base "
                               f"model for it (a saved {c.init} adapter, converted to plain LoRA, can share one)")
    if getattr(first, "quantize", None) != getattr(cfg, "quantize", None):
        raise AdapterError(f"adapter {name!r} and this model's adapters need a base in different precisions (quantize "
                           f"{getattr(cfg, 'quantize', None)!r} vs {getattr(first, 'quantize', None)!r}): "
                           f"adapters on one base share it; load a fresh base model")
    if trained_heads(model):
        raise AdapterError("this classification model trains its head with its adapter, which peftkit keeps one of per "
                           "model: load a fresh base model for another adapter")
    if merged(model):
        raise AdapterError("an adapter is merged into the base weights: call unmerge_adapter before adding another")


def ensure_containers(model: nn.Module) -> None:
    """Wrap each adapted layer of a one-adapter model in a container holding it by name."""
    if containers(model):
        return
    active = model.peftkit_active
    for path, layer in layers_of(model).items():
        replace_module(model, path, AdapterSlots({active: layer}, active))


def collapse(model: nn.Module) -> None:
    """Back to the one-adapter form: each container replaced by its only layer, or by its base."""
    for path, slot in containers(model).items():
        replace_module(model, path, slot.layer(model.peftkit_active))


def add_adapter(model: nn.Module, cfg: Any, name: str) -> nn.Module:
    """Add an adapter beside the model's others; the active one stays active (and alone trains)."""
    _check_shareable(model, cfg, name)
    ensure_containers(model)
    with view(model, None):  # the bare bases are in the tree: the method adapts them as on a fresh model
        METHODS[cfg.method].apply(model, cfg)
        new = layers_of(model)
        for path, layer in new.items():
            layer.requires_grad_(False)
            replace_module(model, path, layer.base)
    slots = containers(model)
    for path, layer in new.items():
        if path in slots:
            slots[path].layers[name] = layer
        else:
            replace_module(model, path, AdapterSlots({name: layer}, model.peftkit_active))
    model.peftkit_adapters[name] = cfg
    model.train(model.training)
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make `name` the adapter that runs, saves and trains (the others' tensors are frozen)."""
    check_name(model, name)
    if merged(model):
        raise AdapterError("an adapter is merged into the base weights: call unmerge_adapter before switching adapters")
    for slot in containers(model).values():
        slot.active = name
    trainable = any(p.requires_grad for p in adapter_parameters(model).values())
    for other in names(model):
        with view(model, other):
            for param in adapter_parameters(model).values():
                param.requires_grad_(False)
    model.peftkit_active, model.peftkit_config = name, model.peftkit_adapters[name]
    for param in adapter_parameters(model).values():
        param.requires_grad_(trainable)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model inside the block (every adapter off), then switch them back on."""
    if not names(model):
        raise AdapterError("this model has no peftkit adapter: there is nothing to disable")
    if merged(model):
        raise AdapterError("the adapter is merged into the base weights: call unmerge_adapter before disabling it")
    virtual = [m for m in model.children() if isinstance(m, VirtualTokens)]
    slots = containers(model)
    bare = {} if slots or virtual else layers_of(model)
    for module in virtual:
        module.detach(model)
    for slot in slots.values():
        slot.active = None
    for path, layer in bare.items():
        replace_module(model, path, layer.base)
    try:
        yield model
    finally:
        for module in virtual:
            module.attach(model)
        for slot in slots.values():
            slot.active = model.peftkit_active
        for path, layer in bare.items():
            replace_module(model, path, layer)


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove one adapter; the last one leaves the plain base model (unmerged)."""
    from peftkit.api import unload_all

    check_name(model, name)
    if merged(model):
        raise AdapterError("an adapter is merged into the base weights: call unmerge_adapter before deleting one")
    if len(names(model)) == 1:
        return unload_all(model)
    for path, slot in containers(model).items():
        base = slot.base
        if name in slot.layers:
            del slot.layers[name]
        if not len(slot.layers):  # only the deleted adapter adapted this layer
            replace_module(model, path, base)
    del model.peftkit_adapters[name]
    if model.peftkit_active == name:
        new = names(model)[0]
        logger.warning("deleted the active adapter %r: %r is active now", name, new)
        set_adapter(model, new)
    if len(names(model)) == 1:
        collapse(model)
    return model


def install_rows_hook(model: nn.Module) -> None:
    """Let `model(..., adapter_names=[...])` and `generate(..., adapter_names=[...])` route rows by name."""
    if getattr(model, "_peftkit_rows_hook", None) is None:
        model._peftkit_rows_hook = (model.register_forward_pre_hook(_rows_start, with_kwargs=True),
                                    model.register_forward_hook(_rows_end, always_call=True))
        if callable(getattr(type(model), "generate", None)):
            model.generate = types.MethodType(_generate, model)


def remove_rows_hook(model: nn.Module) -> None:
    for handle in model.__dict__.pop("_peftkit_rows_hook", None) or ():
        handle.remove()
    model.__dict__.pop("generate", None)


def _generate(model: nn.Module, *args, adapter_names: Sequence[str] | None = None, **kwargs) -> Any:
    """transformers' generate, each row with its adapter (generate checks its keywords against forward's)."""
    if adapter_names is None:
        return type(model).generate(model, *args, **kwargs)
    row_names = check_rows(model, adapter_names)
    made = not containers(model)
    ensure_containers(model)
    try:
        with rows(row_names):
            return type(model).generate(model, *args, **kwargs)
    finally:
        if made:
            collapse(model)


def check_rows(model: nn.Module, row_names: Any) -> tuple[str, ...]:
    """adapter_names for a mixed batch: one known name (or `__base__`) per row."""
    if isinstance(row_names, str) or not isinstance(row_names, Sequence) or not all(isinstance(n, str) for n in row_names):
        raise AdapterError(f"adapter_names must be a list with one adapter name per row, got {row_names!r}")
    unknown = sorted(set(row_names) - {*names(model), BASE})
    if unknown:
        raise AdapterError(f"adapter_names names {unknown[0]!r}, which is not on this model: use one of "
                           f"{', '.join([*names(model), BASE])}")
    if model.training:
        raise AdapterError("adapter_names is for inference: call model.eval() first (training runs the active adapter)")
    if merged(model):
        raise AdapterError("an adapter is merged into the base weights: call unmerge_adapter before mixed batches")
    return tuple(row_names)


def _rows_start(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    row_names = kwargs.pop("adapter_names", None)
    if row_names is not None:
        row_names = check_rows(model, row_names)
        made = not containers(model)
        ensure_containers(model)
        context = rows(row_names)
        context.__enter__()
        model.__dict__.setdefault("_peftkit_rows", []).append((context, made))
    return args, kwargs


def _rows_end(model: nn.Module, args: tuple, output: Any) -> None:
    stack = model.__dict__.get("_peftkit_rows")
    if stack:
        context, made = stack.pop()
        context.__exit__(None, None, None)
        if made:
            collapse(model)
