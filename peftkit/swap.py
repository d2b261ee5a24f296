"""Hot swap: replace an adapter's tensors in place from a saved directory, without rebuilding modules.

A server keeps one model and its layers (and anything compiled or captured over them) while
the adapter it serves changes. The new adapter must adapt the same layers with the same
method; a LoRA may have a lower rank than the loaded one: its factors are padded with zero
rows of A and zero columns of B, which add nothing, and each layer's scale becomes the new
adapter's. The config kept for the slot says rank r_loaded with the alpha that gives that
scale, so saving it again writes an adapter with the same outputs.
"""

import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from peftkit.errors import AdapterError
from peftkit.methods.lora import LoRAConfig, LoRALinear
from peftkit.protocol import PEFT_TYPES, load_adapter_state_dict, one_adapter, state_dict_fit


def swap_adapter(model: nn.Module, directory: str | Path, name: str | None = None) -> nn.Module:
    """Load the adapter in `directory` into the existing adapter `name` (default: the active one).

    Returns:
        The same model; its modules are the same objects as before.

    Raises:
        AdapterError: another method, other target layers, a higher rank, other options
            (DoRA, quantisation), a merged adapter, or an unreadable directory.
    """
    from peftkit.checkpoint import read_adapter_config, read_adapter_weights
    from peftkit.named import check_name, merged

    name = name if name is not None else getattr(model, "peftkit_active", None)
    check_name(model, name)
    if merged(model):
        raise AdapterError("an adapter is merged into the base weights: call unmerge_adapter before swapping")
    old = model.peftkit_adapters[name]
    config = read_adapter_config(directory)
    method = PEFT_TYPES.get(config["peft_type"])
    if method is None or method.name != old.method:
        raise AdapterError(f"{directory} holds a {config['peft_type']} adapter but {name!r} is {old.method}: swap in an "
                           f"adapter of the same method, or load it beside the others with load_adapter(..., name=)")
    new = method.from_peft_config(config)
    weights = read_adapter_weights(directory)
    source = str(Path(directory))
    with one_adapter(model, name):
        cfg, scale = new, None
        if isinstance(old, LoRAConfig):
            cfg, weights, scale = _fit_lora(old, new, weights, source)
        _check_fits(model, weights, source, name)
        if scale is not None:
            for module in model.modules():
                if isinstance(module, LoRALinear):
                    module.scale = scale
        load_adapter_state_dict(model, weights, source)
    model.peftkit_adapters[name] = cfg
    if model.peftkit_active == name:
        model.peftkit_config = cfg
    return model


def _check_fits(model: nn.Module, weights: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Every tensor has its place, in shape, before anything is changed."""
    _, missing, extra, wrong = state_dict_fit(model, weights)
    if extra or missing or wrong:
        key = (extra or missing or wrong)[0]
        raise AdapterError(f"{source} does not adapt the same layers as {name!r} ({len(extra)} extra, {len(missing)} "
                           f"missing, {len(wrong)} other-shaped tensors; {key!r}): swap in an adapter with the same "
                           f"targets, or load it beside the others with load_adapter(..., name=)")


def _fit_lora(old: LoRAConfig, new: LoRAConfig, weights: dict[str, torch.Tensor],
              source: str) -> tuple[LoRAConfig, dict[str, torch.Tensor], float]:
    """The new LoRA's tensors padded to the loaded rank, the config that says so, and the new scale."""
    for field in ("dora", "quantize"):
        if getattr(old, field) != getattr(new, field):
            raise AdapterError(f"{source} has {field}={getattr(new, field)!r} but the loaded adapter "
                               f"{getattr(old, field)!r}: swap in an adapter with the same {field}")
    if new.r > old.r:
        raise AdapterError(f"{source} has rank {new.r}, above the loaded adapter's {old.r}: load it with "
                           f"load_adapter(..., name=) instead, or load the higher rank first")
    padded = {}
    for key, tensor in weights.items():
        if key.endswith("lora_A.weight"):  # (r_new, in) -> (r_old, in)
            tensor = torch.cat([tensor, tensor.new_zeros(old.r - tensor.shape[0], tensor.shape[1])])
        elif key.endswith("lora_B.weight"):  # (out, r_new) -> (out, r_old)
            tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], old.r - tensor.shape[1])], dim=1)
        padded[key] = tensor
    alpha = new.scale * (math.sqrt(old.r) if new.rslora else old.r)
    return replace(new, r=old.r, alpha=alpha, target_modules=old.target_modules), padded, new.scale
