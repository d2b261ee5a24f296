"""What every method that wraps linear layers shares: the wrapped layer, merge by a weight
delta, and the protocol's apply / merge / unmerge / unload over those layers.

A method is an `AdapterLayer` subclass (its parameters and `forward`, plus `delta_weight` if it
can merge) and a `LayerMethod` subclass (its config, its peft config fields). Layers follow
peft's conventions: the frozen layer is `self.base`; a GPT-2 `Conv1D` (weight (in, out)) is
wrapped as it is and its delta stored transposed (peft's `fan_in_fan_out`).
"""

from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.errors import AdapterError, ConfigError
from peftkit.targets import ALL_LINEAR, expand_all_linear, family_targets, find_targets, replace_module


def check_targets(targets: Any) -> list[str] | str:
    """target_modules as names, a regex or `all-linear`; a ConfigError otherwise."""
    if isinstance(targets, (list, tuple)):
        if targets and all(isinstance(t, str) and t for t in targets):
            return list(targets)
    elif isinstance(targets, str) and targets:
        return targets
    raise ConfigError(f"target_modules must be module names, a regex or 'all-linear', got {targets!r}")


def check_positive_int(name: str, value: Any, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}{hint}")


def check_number(name: str, value: Any, low: float, high: float, hint: str = "") -> None:
    """`low <= value < high` (a bool is no number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value < high:
        raise ConfigError(f"{name} must be a number in [{low:g}, {high:g}), got {value!r}{hint}")


def check_flags(cfg: Any, *names: str) -> None:
    for name in names:
        if not isinstance(getattr(cfg, name), bool):
            raise ConfigError(f"{name} must be true or false, got {getattr(cfg, name)!r}")


def linear_dims(base: nn.Module) -> tuple[int, int]:
    """(in, out) of an `nn.Linear` or a GPT-2 `Conv1D` (whose weight is (in, out))."""
    return tuple(base.weight.shape) if isinstance(base, Conv1D) else (base.in_features, base.out_features)


def adapter_factory(base: nn.Module, values: torch.Tensor) -> torch.Tensor:
    """Fresh adapter values on the base's device, fp32 over a half-precision base, as peft keeps them.

    peft first casts new adapter tensors to the base weight's dtype, then back up to fp32: over a
    bf16 base the starting values are bf16-rounded. This does the same, so both start alike.
    """
    weight = base.weight
    dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
    return values.to(weight.device, weight.dtype).to(dtype)


class AdapterLayer(nn.Module):
    """A frozen linear layer (`self.base`) with an adapter on top.

    Subclasses create their parameters, list them in `adapter_parameter_names` (peft's names
    relative to the layer), and define `forward`; additive methods define `delta_weight()`,
    shape (out, in), which `merge` adds to the base weight. A method whose merge is not an
    addition overrides `_merge` and sets `exact_unmerge`: unmerge then puts the replaced weight
    and bias back instead of subtracting.
    """

    adapter_parameter_names: tuple[str, ...] = ()
    exact_unmerge: ClassVar[bool] = False  # keep the replaced base tensors while merged, to put them back

    def __init__(self, base: nn.Linear | Conv1D) -> None:
        super().__init__()
        self.base = base
        self.fan_in_fan_out = isinstance(base, Conv1D)
        self.in_features, self.out_features = linear_dims(base)
        self.merged = False
        self._unmerged: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (weight, bias) a merge replaced

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight, for model code that reads `layer.weight.dtype` (T5's feed-forward)."""
        return self.base.weight

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        return F.linear(x, base.weight, base.bias) if type(base) is nn.Linear else base(x)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as (out, in) (a Conv1D's, transposed: a view)."""
        return self.base.weight.T if self.fan_in_fan_out else self.base.weight

    def _store(self, weight: torch.Tensor) -> None:
        """Write an (out, in) weight into the base layer in its own layout and dtype."""
        stored = self.base.weight
        stored.data = (weight.T.contiguous() if self.fan_in_fan_out else weight).to(stored.dtype)

    def _merge(self) -> None:
        """W <- W + delta, as peft adds its delta weight."""
        self._store(self.base_weight() + self.delta_weight().to(self.base.weight.dtype))

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base layer; an error if already merged."""
        if self.merged:
            raise AdapterError("adapter is already merged: call unmerge_adapter first, or merge only once")
        if self.exact_unmerge:  # merge assigns new tensors: the replaced ones stay intact
            bias = self.base.bias
            self._unmerged = (self.base.weight.data, None if bias is None else bias.data)
        self._merge()
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - delta, or the stored weight and bias back bit for bit (`exact_unmerge`)."""
        if not self.merged:
            raise AdapterError("adapter is not merged: nothing to unmerge")
        if self._unmerged is None:
            self._store(self.base_weight() - self.delta_weight().to(self.base.weight.dtype))
        else:
            self.base.weight.data, bias = self._unmerged
            if bias is not None:
                self.base.bias.data = bias
            self._unmerged = None
        self.merged = False


class LayerMethod:
    """The adapter protocol for a method made of `AdapterLayer`s (see `peftkit.protocol`).

    A subclass sets `name`, `peft_type`, `config_class`, `module_class`, and writes `build`
    (one layer from its base and the config), `peft_fields` and `from_peft_config`.
    """

    name: ClassVar[str]
    peft_type: ClassVar[str]
    config_class: ClassVar[type]
    module_class: ClassVar[type[AdapterLayer]]
    mergeable: ClassVar[bool] = True
    padding_free: ClassVar[bool] = True  # trains on packed rows: the layers see only the model's own tokens
    supported_bases: ClassVar[tuple[type, ...]] = (nn.Linear, Conv1D)
    has_fan_in_fan_out: ClassVar[bool] = True  # peft's config has the field (LoHa's and LoKr's do not)

    def build(self, base: nn.Module, cfg: Any, name: str, model: nn.Module) -> AdapterLayer:
        raise NotImplementedError(f"{type(self).__name__} must say how to build its layer")

    def target_names(self, model: nn.Module, cfg: Any) -> list[str]:
        """The layers to wrap; [q_proj, v_proj] in the family's own names (BERT: query, value)."""
        cfg.target_modules = family_targets(model, cfg.target_modules)
        return find_targets(model, cfg.target_modules, self.supported_bases)

    def apply(self, model: nn.Module, cfg: Any) -> nn.Module:
        names = self.target_names(model, cfg)  # validates every target before anything is replaced
        for name in names:
            replace_module(model, name, self.build(model.get_submodule(name), cfg, name, model))
        return model

    def modules(self, model: nn.Module) -> list[AdapterLayer]:
        return [m for m in model.modules() if isinstance(m, self.module_class)]

    def _each(self, model: nn.Module, merged: bool, action: Callable[[AdapterLayer], None]) -> None:
        modules = self.modules(model)
        if merged and not all(m.merged for m in modules):
            raise AdapterError("adapter is not merged: nothing to unmerge")
        if not merged and any(m.merged for m in modules):
            raise AdapterError("adapter is already merged: call unmerge_adapter first, or merge only once")
        for module in modules:
            action(module)

    def merge(self, model: nn.Module) -> None:
        if not self.mergeable:
            raise AdapterError(f"{self.name} cannot be merged into the base weights: keep the adapter unmerged "
                               f"(peftkit eval and generate run it as it is)")
        self._each(model, False, lambda m: m.merge())

    def unmerge(self, model: nn.Module) -> None:
        self._each(model, True, lambda m: m.unmerge())

    def unload(self, model: nn.Module) -> nn.Module:
        """Put the base layers back (merged or not), leaving a plain transformers model."""
        for name, module in list(model.named_modules()):
            if isinstance(module, self.module_class):
                replace_module(model, name, module.base)
        return model

    def saved_targets(self, cfg: Any, model: nn.Module) -> list[str] | str:
        """target_modules as peft saves them (`all-linear` expanded to the adapted layers' names)."""
        if cfg.target_modules != ALL_LINEAR:
            return cfg.target_modules
        return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                       if isinstance(m, self.module_class)}) or expand_all_linear(model)

    def peft_fields(self, cfg: Any, model: nn.Module) -> dict:
        return {}

    def to_peft_config(self, cfg: Any, model: nn.Module) -> dict:
        fields = {"peft_type": self.peft_type, "task_type": "CAUSAL_LM", "target_modules": self.saved_targets(cfg, model),
                  "modules_to_save": None, "inference_mode": True, **self.peft_fields(cfg, model)}
        if self.has_fan_in_fan_out:
            fields["fan_in_fan_out"] = any(m.fan_in_fan_out for m in self.modules(model))
        return fields


def reject_unsupported(peft: dict, unsupported: dict[str, tuple]) -> None:
    """A one-line error for an adapter_config.json field whose value peftkit cannot reproduce."""
    for key, allowed in unsupported.items():
        if peft.get(key, allowed[0]) not in allowed:
            raise AdapterError(f"adapter_config.json sets {key}={peft[key]!r}, which peftkit does not support: "
                               f"re-save the adapter without it")
