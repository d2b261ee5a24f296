"""LoHa (Hyeon-Woo et al., 2022, "FedPara", section 3; as in LyCORIS), from scratch.

    delta W = scale * (W1a W1b) * (W2a W2b),   scale = alpha / r,   y = base(x) + x @ delta W^T

The Hadamard product of two rank-r products reaches rank r^2 with the parameters of rank 2r
LoRA. W1a, W1b, W2a are kaiming-uniform (FedPara's He init), W2b zeros: a fresh adapter
changes nothing. The delta is built by a custom autograd function that keeps only the four
factors for backward (not the two (out, in) products), as LyCORIS and peft do. Parameter
names are peft's (`hada_w1_a`, ... , no `.weight`).
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftkit.methods.layer import adapter_factory
from peftkit.methods.lycoris import LycorisConfig, LycorisLinear, LycorisMethod, lycoris_fields


@dataclass
class LoHaConfig(LycorisConfig):
    """A LoHa adapter, as written in an `adapters/*.yaml` preset (r: the rank of each of the two factors)."""

    method: ClassVar[str] = "loha"


class _HadamardProduct(torch.autograd.Function):
    """(W1a W1b) * (W2a W2b) * scale, keeping the factors only for backward."""

    @staticmethod
    def forward(ctx, w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(w1a, w1b, w2a, w2b, scale)
        return ((w1a @ w1b) * (w2a @ w2b)) * scale

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w1a, w1b, w2a, w2b, scale = ctx.saved_tensors
        grad_out = grad_out * scale
        grad = grad_out * (w2a @ w2b)  # d/d(W1a W1b), (out, in)
        grad_w1a, grad_w1b = grad @ w1b.T, w1a.T @ grad
        grad = grad_out * (w1a @ w1b)  # d/d(W2a W2b)
        return grad_w1a, grad_w1b, grad @ w2b.T, w2a.T @ grad, None


class LoHaLinear(LycorisLinear):
    """A linear layer with a LoHa update (see the module docstring)."""

    adapter_parameter_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")

    def __init__(self, base: nn.Linear, r: int, alpha: float, rank_dropout: float = 0.0,
                 module_dropout: float = 0.0) -> None:
        super().__init__(base, r, alpha, rank_dropout, module_dropout)
        shapes = {"hada_w1_a": (self.out_features, r), "hada_w1_b": (r, self.in_features),
                  "hada_w2_a": (self.out_features, r), "hada_w2_b": (r, self.in_features)}
        for name, shape in shapes.items():
            values = torch.zeros(shape)
            if name != "hada_w2_b":
                nn.init.kaiming_uniform_(values, a=math.sqrt(5))
            setattr(self, name, nn.Parameter(adapter_factory(base, values)))

    def delta_weight(self) -> torch.Tensor:
        scale = torch.tensor(self.scale, device=self.hada_w1_a.device)
        return _HadamardProduct.apply(self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, scale)


class LoHaMethod(LycorisMethod):
    """LoHa answering the adapter protocol."""

    name = "loha"
    peft_type = "LOHA"
    config_class = LoHaConfig
    module_class = LoHaLinear

    def build(self, base: nn.Linear, cfg: LoHaConfig, name: str, model: nn.Module) -> LoHaLinear:
        return LoHaLinear(base, cfg.r, cfg.alpha, cfg.rank_dropout, cfg.module_dropout)

    def peft_fields(self, cfg: LoHaConfig, model: nn.Module) -> dict:
        return super().peft_fields(cfg, model) | {"use_effective_conv2d": False}

    def from_peft_config(self, peft: dict) -> LoHaConfig:
        return LoHaConfig(**lycoris_fields(peft))
