"""(IA)^3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", section 3.3), from scratch: learned vectors that rescale activations.

    attention layers (k, v):      y = l * base(x)          l: (out, 1), scales each output
    feed-forward layer (down):    y = base(l * x)          l: (1, in), scales each input

The paper rescales keys, values and the feed-forward hidden activation, l_ff * gamma(W1 x); as
in peft, that is the input of the feed-forward output layer (`down_proj`). l starts at ones, so
a fresh adapter changes nothing. Merging multiplies W's rows (or columns) by l, and a scaled
output's bias too. Unmerging puts back the stored weights exactly; peft divides by l + 1e-8
instead, which is not exact. peft's feed-forward test is a plain suffix match (`endswith`, no
dot boundary); we use the same rule so both pick the same layers. Parameter name: `ia3_l`.
"""

import re
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.methods.layer import AdapterLayer, LayerMethod, adapter_factory, check_targets, reject_unsupported

DEFAULT_TARGETS = ["k_proj", "v_proj", "down_proj"]  # peft's defaults for Llama


@dataclass
class IA3Config:
    """An (IA)^3 adapter, as written in an `adapters/*.yaml` preset."""

    method: ClassVar[str] = "ia3"
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))  # names, a regex, or all-linear
    feedforward_modules: list[str] | str = field(default_factory=lambda: ["down_proj"])  # of those, the ones whose input is scaled

    def __post_init__(self) -> None:
        self.target_modules = check_targets(self.target_modules)
        if isinstance(self.feedforward_modules, (list, tuple)):
            self.feedforward_modules = list(self.feedforward_modules)
            if not all(isinstance(t, str) and t for t in self.feedforward_modules):
                raise ConfigError(f"feedforward_modules must be module names or a regex, got {self.feedforward_modules!r}")
            if isinstance(self.target_modules, list) and not set(self.feedforward_modules) <= set(self.target_modules):
                raise ConfigError(f"feedforward_modules {self.feedforward_modules} must be a subset of target_modules "
                                  f"{self.target_modules}: add them to target_modules")
        elif not isinstance(self.feedforward_modules, str):
            raise ConfigError(f"feedforward_modules must be module names or a regex, got {self.feedforward_modules!r}")


def is_feedforward(name: str, feedforward_modules: list[str] | str) -> bool:
    """peft's rule: a regex over the full name, or a plain suffix of it."""
    if isinstance(feedforward_modules, str):
        return re.fullmatch(feedforward_modules, name) is not None
    return any(name.endswith(suffix) for suffix in feedforward_modules)


class IA3Linear(AdapterLayer):
    """A linear layer whose output (or, for a feed-forward layer, input) is rescaled by `ia3_l`."""

    adapter_parameter_names = ("ia3_l",)
    exact_unmerge = True  # peft divides by l + 1e-8, which does not give W back exactly

    def __init__(self, base: nn.Module, feedforward: bool) -> None:
        super().__init__(base)
        self.feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(adapter_factory(base, torch.ones(shape)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_forward(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self.base_forward((x.to(scale.dtype) * scale).to(x.dtype))
        result = self.base_forward(x)
        return (result * scale).to(result.dtype)

    def _merge(self) -> None:
        """W <- W * l (rows, or columns for a feed-forward layer); a scaled output's bias <- b * l."""
        weight, bias = self.base.weight, self.base.bias
        scale = self.ia3_l.data.T if self.fan_in_fan_out else self.ia3_l.data
        weight.data = torch.mul(weight.data, scale).to(weight.dtype)
        if not self.feedforward and bias is not None:
            bias.data = torch.mul(bias.data, self.ia3_l.data.reshape(bias.shape)).to(bias.dtype)

    def extra_repr(self) -> str:
        return f"feedforward={self.feedforward}, merged={self.merged}"


class IA3Method(LayerMethod):
    """(IA)^3 answering the adapter protocol."""

    name = "ia3"
    peft_type = "IA3"
    config_class = IA3Config
    module_class = IA3Linear

    def build(self, base: nn.Module, cfg: IA3Config, name: str, model: nn.Module) -> IA3Linear:
        return IA3Linear(base, is_feedforward(name, cfg.feedforward_modules))

    def peft_fields(self, cfg: IA3Config, model: nn.Module) -> dict:
        feedforward = cfg.feedforward_modules
        if cfg.target_modules == "all-linear" and isinstance(feedforward, list):
            feedforward = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                                  if isinstance(m, IA3Linear) and m.feedforward}) or feedforward
        return {"feedforward_modules": feedforward, "init_ia3_weights": True, "exclude_modules": None}

    def from_peft_config(self, peft: dict) -> IA3Config:
        reject_unsupported(peft, {"exclude_modules": (None, [])})
        return IA3Config(target_modules=peft["target_modules"], feedforward_modules=peft["feedforward_modules"])
