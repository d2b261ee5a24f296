"""The adapter protocol: every method answers it, so training, saving, merging and reports
never branch on the method.

A model carries its adapter's config as `model.peftkit_config`; `method_of(model)` finds the
method that applied it. Module-based methods (LoRA, DoRA, QLoRA) mark their trainable tensors
with `adapter_parameter_names`; their state dict uses peft's key names. An adapter module may name
its own keys (`peft_parameters`) and compute its own saved tensors (`peft_state_dict`): prefix and
prompt tuning save the bare key `prompt_embeddings`, with prefix-tuning's MLP folded in; beside
them a classification head is saved under `base_model.classifier.weight`, without LoRA's `.model`,
since peft wraps no tuner model around the base for prompt learning. Frozen tensors an adapter
saves beside its parameters (VeRA's shared random matrices) come from `peft_buffers`; a layer
that saves less than it trains (AdaLoRA's pruned ranks) says what in `saved_tensors`.

Optional, for methods that shape training itself: `regularization(model)`, a term added to
the loss (AdaLoRA's orthogonality penalty), and `allocator(model)`, an object whose
`update_and_allocate(step)` runs after each optimizer step (AdaLoRA's rank budget).

The methods themselves, one module each, are registered in `peftkit.methods`.
"""

from typing import Any, Protocol

import torch
from torch import nn

from peftkit.errors import AdapterError
from peftkit.methods import METHODS
from peftkit.methods.virtual_tokens import VirtualTokens
from peftkit.slots import view

PEFT_PREFIX = "base_model.model."  # peft's saved keys start with this
PROMPT_LEARNING_PREFIX = "base_model."  # ... or, with prefix and prompt tuning, with this


class AdapterMethod(Protocol):
    name: str
    peft_type: str
    config_class: type
    mergeable: bool  # merge() folds the adapter into the weights (else it raises)
    padding_free: bool  # trains on packed rows (virtual tokens need the padded layout: a cache would bridge rows)

    def apply(self, model: nn.Module, cfg: Any) -> nn.Module:
        """Inject the adapter in place (the caller freezes the base)."""

    def merge(self, model: nn.Module) -> None:
        """Fold the adapter into the base weights; an error for methods that cannot."""

    def unmerge(self, model: nn.Module) -> None:
        """Undo merge."""

    def unload(self, model: nn.Module) -> nn.Module:
        """Remove the adapter modules, leaving the (possibly merged) base model."""

    def to_peft_config(self, cfg: Any, model: nn.Module) -> dict:
        """The adapter_config.json fields in peft's schema."""

    def from_peft_config(self, peft: dict) -> Any:
        """The config from a peft adapter_config.json; an error naming unsupported fields."""


PEFT_TYPES: dict[str, AdapterMethod] = {m.peft_type: m for m in METHODS.values()}


def method_of(model: nn.Module) -> AdapterMethod:
    cfg = getattr(model, "peftkit_config", None)
    if cfg is None:
        raise AdapterError("this model has no peftkit adapter: call apply_adapter or load_adapter first")
    return METHODS[cfg.method]


def adapter_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that declares adapter parameters, by full name."""
    return {name: m for name, m in model.named_modules() if hasattr(m, "adapter_parameter_names")}


def key_prefix(model: nn.Module) -> str:
    """The start of peft's saved keys for this model's adapter modules (LoRA's, or a trained head)."""
    return PROMPT_LEARNING_PREFIX if any(isinstance(m, VirtualTokens) for m in model.children()) else PEFT_PREFIX


def module_parameters(name: str, module: nn.Module, prefix: str = PEFT_PREFIX) -> dict[str, nn.Parameter]:
    """One adapter module's parameters under peft's key names: its own, or its declared names."""
    if hasattr(module, "peft_parameters"):
        return module.peft_parameters()
    return {f"{prefix}{name}.{pname}": module.get_parameter(pname) for pname in module.adapter_parameter_names}


def one_adapter(model: nn.Module, name: str | None = None):
    """A block in which the model holds only adapter `name` (default: the active one); see `peftkit.slots`."""
    return view(model, name if name is not None else getattr(model, "peftkit_active", None))


def adapter_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """The adapter's parameters under peft's saved key names, from each module's declared names.

    Args:
        name: which of several named adapters (default: the active one).
    """
    params = {}
    with one_adapter(model, name):
        prefix = key_prefix(model)
        for path, module in adapter_modules(model).items():
            params.update(module_parameters(path, module, prefix))
    return params


def adapter_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Frozen tensors an adapter saves beside its parameters (VeRA's shared random matrices), by peft's key."""
    buffers = {}
    for module in adapter_modules(model).values():
        if hasattr(module, "peft_buffers"):
            buffers.update(module.peft_buffers())
    return buffers


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors only, detached and contiguous, under peft's key names.

    Args:
        name: which of several named adapters (default: the active one).
    """
    with one_adapter(model, name):
        return _state_dict(model)


def _state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    state, prefix = {}, key_prefix(model)
    for name, module in adapter_modules(model).items():
        if hasattr(module, "peft_state_dict"):
            state.update(module.peft_state_dict())
        elif hasattr(module, "saved_tensors"):  # AdaLoRA: the surviving ranks only
            state.update({f"{prefix}{name}.{key}": t.detach().contiguous() for key, t in module.saved_tensors().items()})
        else:
            state.update({key: p.detach().contiguous() for key, p in module_parameters(name, module, prefix).items()})
    state.update({key: b.detach().contiguous() for key, b in adapter_buffers(model).items()})
    return state


def state_dict_fit(model: nn.Module, state_dict: dict[str, torch.Tensor], name: str | None = None
                   ) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[str]]:
    """(the adapter's tensors by key, missing keys, unexpected keys, keys whose shapes differ) for
    loading `state_dict` into adapter `name` (default: the active one)."""
    with one_adapter(model, name):
        params = adapter_parameters(model) | adapter_buffers(model)
    missing = sorted(params.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - params.keys())
    wrong = [key for key, param in params.items() if key in state_dict and state_dict[key].shape != param.shape]
    return params, missing, unexpected, wrong


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "state dict",
                            name: str | None = None) -> None:
    """Copy tensors into the adapter (`name`, default: the active one); every key must match in name
    and shape, checked before anything is copied.

    Raises:
        AdapterError: a missing or unexpected key, or a shape mismatch (an adapter made for
            another base model), naming the tensor and both shapes.
    """
    params, missing, unexpected, wrong = state_dict_fit(model, state_dict, name)
    base = getattr(model, "peftkit_base_name", "this model")
    if missing or unexpected:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise AdapterError(f"{source} does not fit {base} ({len(missing)} missing, {len(unexpected)} unexpected "
                           f"tensors; {detail}): load it onto the base model it was trained for")
    if wrong:
        key = wrong[0]
        raise AdapterError(f"{source}: tensor {key} has shape {tuple(state_dict[key].shape)} but {base} expects "
                           f"{tuple(params[key].shape)}: this adapter was made for another base model")
    for key, param in params.items():
        param.copy_(state_dict[key])
