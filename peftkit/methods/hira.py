"""HiRA (Huang et al., 2025, "HiRA: Parameter-Efficient Hadamard High-Rank Adaptation"), from scratch.

    y = base(x) + dropout(x) @ (W0 * (B A))^T

The update is the frozen weight W0 (out, in) scaled elementwise by a rank-r product B A, so
its rank is up to rank(W0) * r rather than r (paper, section 3). There is no alpha: B starts
at zero, A kaiming-uniform, so a fresh adapter changes nothing. Merging gives W0 * (1 + B A),
and unmerging puts back the stored W0 exactly (as peft does), since dividing by (1 + B A)
would not. Parameter names are peft's (`hira_A`, `hira_B`, no `.weight`).
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import ConfigError
from peftkit.methods.layer import AdapterLayer, LayerMethod, adapter_factory, check_number, check_positive_int, check_targets, reject_unsupported

INITS = ("default", "gaussian")


@dataclass
class HiRAConfig:
    """A HiRA adapter, as written in an `adapters/*.yaml` preset."""

    method: ClassVar[str] = "hira"
    r: int = 32  # rank of B A, the elementwise factor of W0
    dropout: float = 0.0  # dropout on the adapter's input during training
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # names, a regex, or all-linear
    init: str = "default"  # A: kaiming-uniform (default) or normal(0, 1/r) (gaussian); B: zeros

    def __post_init__(self) -> None:
        check_positive_int("r", self.r, ": set r to 16 or 32")
        check_number("dropout", self.dropout, 0.0, 1.0)
        self.target_modules = check_targets(self.target_modules)
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")


class HiRALinear(AdapterLayer):
    """A linear layer with HiRA's Hadamard update (see the module docstring)."""

    adapter_parameter_names = ("hira_A", "hira_B")
    exact_unmerge = True  # dividing by (1 + B A) would not give W0 back exactly

    def __init__(self, base: nn.Module, r: int, dropout: float = 0.0, init: str = "default") -> None:
        super().__init__(base)
        self.r = r
        weight_a = torch.empty(r, self.in_features)
        if init == "gaussian":
            nn.init.normal_(weight_a, std=1 / r)
        else:
            nn.init.kaiming_uniform_(weight_a, a=math.sqrt(5))
        self.hira_A = nn.Parameter(adapter_factory(base, weight_a))
        self.hira_B = nn.Parameter(adapter_factory(base, torch.zeros(self.out_features, r)))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def delta_weight(self) -> torch.Tensor:
        """W0 * (B A), shape (out, in): the weight the update adds."""
        return self.base_weight() * (self.hira_B @ self.hira_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.merged:
            return result
        x = x.to(self.hira_A.dtype)
        # (B A) as peft computes it, (A^T B^T)^T, so the products round alike.
        update = self.base_weight() * torch.mm(self.hira_A.T, self.hira_B.T).T  # (out, in)
        return (result + F.linear(self.dropout(x), update)).to(result.dtype)

    def _merge(self) -> None:
        """W <- W0 + W0 * (B A), with B A in the weight's dtype first, as peft merges."""
        weight = self.base.weight
        product = self.hira_B @ self.hira_A
        weight.data = weight.data + weight.data * (product.T if self.fan_in_fan_out else product).to(weight.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, merged={self.merged}"


class HiRAMethod(LayerMethod):
    """HiRA answering the adapter protocol."""

    name = "hira"
    peft_type = "HIRA"
    config_class = HiRAConfig
    module_class = HiRALinear

    def build(self, base: nn.Module, cfg: HiRAConfig, name: str, model: nn.Module) -> HiRALinear:
        return HiRALinear(base, cfg.r, cfg.dropout, cfg.init)

    def peft_fields(self, cfg: HiRAConfig, model: nn.Module) -> dict:
        return {"r": cfg.r, "hira_dropout": cfg.dropout, "init_weights": "gaussian" if cfg.init == "gaussian" else True,
                "rank_pattern": {}, "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}

    def from_peft_config(self, peft: dict) -> HiRAConfig:
        reject_unsupported(peft, {"rank_pattern": ({}, None), "layers_to_transform": (None, []),
                                  "exclude_modules": (None, [])})
        return HiRAConfig(r=peft.get("r", 32), dropout=peft.get("hira_dropout", 0.0),
                          target_modules=peft["target_modules"],
                          init="gaussian" if peft.get("init_weights") == "gaussian" else "default")
