"""Which modules an adapter replaces, with peft's matching rules so both sides pick the same ones.

- a list of names: a module matches when its full name equals a name or ends with `.name`;
- a string: a regular expression that must match the full module name (`re.fullmatch`);
- `all-linear`: every linear layer (`nn.Linear`, GPT-2's `Conv1D`, or 4-bit) except the heads: the
  output embedding and a classification head (`classifier` / `score`), which a classification task
  trains fully instead (peft 0.21 targets a token classifier's head too, then fails to train it).
"""

import logging
import re
from collections.abc import Iterable

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.errors import AdapterError
from peftkit.models.tasks import HEAD_NAMES
from peftkit.nf4 import Linear4bit

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
QUERY_VALUE = ["q_proj", "v_proj"]  # the lora preset's targets, in Llama's names
LINEAR_TYPES = (nn.Linear, Conv1D, Linear4bit)


def head_names(model: nn.Module) -> set[str]:
    """Full names of the output embedding and of every module inside a classification head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    for attr in HEAD_NAMES:
        if isinstance(getattr(model, attr, None), nn.Module):
            names |= {f"{attr}.{sub}" if sub else attr for sub, _ in getattr(model, attr).named_modules()}
    return names


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every linear layer (`nn.Linear`, `Conv1D` or 4-bit `Linear4bit`), the heads excluded."""
    heads = head_names(model)
    return [name for name, module in model.named_modules()
            if isinstance(module, LINEAR_TYPES) and name not in heads]


def kept_in_full_precision(model: nn.Module, name: str) -> bool:
    """A layer the model asks to keep unquantised (`_keep_in_fp32_modules`, e.g. T5's `wo`, whose
    forward casts its input to the weight's dtype), which transformers' 4-bit loader skips too."""
    kept = getattr(model, "_keep_in_fp32_modules", None) or ()
    return any(part in kept for part in name.split("."))


def quantizable_names(model: nn.Module) -> list[str]:
    """The linear layers a 4-bit base quantises: all but the heads and the layers kept in full precision."""
    return [name for name in linear_module_names(model) if not kept_in_full_precision(model, name)]


def expand_all_linear(model: nn.Module) -> list[str]:
    """`all-linear` as peft saves it: the sorted set of last name components."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_module_names(model)})


def family_targets(model: nn.Module, target_modules: str | list[str]) -> str | list[str]:
    """The lora preset's `[q_proj, v_proj]` in the names of a family that calls them otherwise
    (BERT: query, value; T5: q, v; GPT-2: c_attn), as peft's per-model defaults; anything else as given."""
    from peftkit.models.registry import family_of

    family = family_of(getattr(getattr(model, "config", None), "model_type", ""))
    own = getattr(family, "QUERY_VALUE", None)
    if target_modules != QUERY_VALUE or own is None or any(matches(n, QUERY_VALUE) for n, _ in model.named_modules()):
        return target_modules
    logger.info("target_modules %s: this %s model calls them %s", QUERY_VALUE, model.config.model_type, list(own))
    return list(own)


def matches(name: str, target_modules: str | Iterable[str]) -> bool:
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == target or name.endswith("." + target) for target in target_modules)


def find_targets(model: nn.Module, target_modules: str | list[str], supported: tuple[type, ...]) -> list[str]:
    """Names of the modules to adapt, in model order.

    Raises:
        AdapterError: nothing matches (the message lists the model's linear layers), or a
            matched module has a type the adapter cannot wrap.
    """
    excluded = set()
    if target_modules == ALL_LINEAR:
        target_modules, excluded = expand_all_linear(model), head_names(model)
    names = [name for name, _ in model.named_modules()
             if name and name not in excluded and matches(name, target_modules)]
    if not names:
        suffixes = expand_all_linear(model)
        raise AdapterError(f"target_modules {target_modules!r} match no module of this model: use names from "
                           f"{suffixes} (or a regex over full names such as 'model.layers.0.self_attn.q_proj', "
                           f"or 'all-linear')")
    modules = dict(model.named_modules())
    for name in names:
        if not isinstance(modules[name], supported):
            kinds = ", ".join(cls.__name__ for cls in supported)
            raise AdapterError(f"target module {name!r} is a {type(modules[name]).__name__}, which this adapter "
                               f"cannot wrap (it wraps {kinds}): narrow target_modules to those layers")
    return names


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
