"""What LoHa and LoKr share (both from the LyCORIS family): an update built as a full weight
delta and applied as y = base(x) + x @ delta^T, with LyCORIS' two dropouts.

- module dropout: while training, the whole update is skipped for a batch with probability p;
- rank dropout: while training, each output row of the delta is zeroed with probability p
  (LoHa rescales the kept rows by 1 / their mean; LoKr only with `rank_dropout_scale`).
Both draw from torch's global generator in peft's order (the module draw first, on every
training forward), so a seed gives the same masks as peft.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import ConfigError
from peftkit.methods.layer import (AdapterLayer, LayerMethod, check_number, check_positive_int, check_targets,
                                   reject_unsupported)

LYCORIS_UNSUPPORTED = {"rank_pattern": ({}, None), "alpha_pattern": ({}, None), "layers_to_transform": (None, []),
                       "exclude_modules": (None, []), "use_effective_conv2d": (False, True)}


@dataclass
class LycorisConfig:
    """The fields LoHa and LoKr configs share."""

    r: int = 8  # rank of a factor
    alpha: float = 8.0  # scale = alpha / r
    rank_dropout: float = 0.0  # while training, zero each output row of the delta with this probability
    module_dropout: float = 0.0  # while training, skip the whole update with this probability
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # names, a regex, or all-linear

    def __post_init__(self) -> None:
        check_positive_int("r", self.r, ": set r to 8 or 16")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}: alpha = r gives scale 1")
        check_number("rank_dropout", self.rank_dropout, 0.0, 1.0)
        check_number("module_dropout", self.module_dropout, 0.0, 1.0)
        self.target_modules = check_targets(self.target_modules)


def lycoris_fields(peft: dict) -> dict:
    """The shared fields of a LoHa / LoKr adapter_config.json; an error for what peftkit cannot reproduce."""
    reject_unsupported(peft, LYCORIS_UNSUPPORTED)
    return {"r": peft.get("r", 8), "alpha": peft.get("alpha", 8), "rank_dropout": peft.get("rank_dropout", 0.0),
            "module_dropout": peft.get("module_dropout", 0.0), "target_modules": peft["target_modules"]}


class LycorisLinear(AdapterLayer):
    """A linear layer whose subclass defines `delta_weight()` (out, in), with module and rank dropout in training."""

    rescale_rank_dropout: bool = True

    def __init__(self, base: nn.Linear, r: int, alpha: float, rank_dropout: float, module_dropout: float) -> None:
        super().__init__(base)
        self.r, self.scale = r, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.merged or (self.training and not torch.rand(1) > self.module_dropout):
            return result.to(x.dtype)
        delta = self.delta_weight()
        if self.training and self.rank_dropout:
            keep = (torch.rand(delta.size(0)) > self.rank_dropout).to(delta.dtype)
            if self.rescale_rank_dropout:
                keep /= keep.mean()
            delta = delta * keep.view(-1, 1).to(delta.device)
        return (result + F.linear(x.to(delta.dtype), delta)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scale={self.scale:g}, merged={self.merged}"


class LycorisMethod(LayerMethod):
    """LoHa's and LoKr's protocol: the shared peft fields; subclasses add their own."""

    supported_bases: ClassVar[tuple[type, ...]] = (nn.Linear,)  # as peft's LoHa / LoKr: no GPT-2 Conv1D
    has_fan_in_fan_out = False  # LoHaConfig / LoKrConfig have no such field (peft warns on an unknown key)

    def peft_fields(self, cfg: object, model: nn.Module) -> dict:
        return {"r": cfg.r, "alpha": cfg.alpha, "rank_dropout": cfg.rank_dropout, "module_dropout": cfg.module_dropout,
                "rank_pattern": {}, "alpha_pattern": {}, "exclude_modules": None, "layers_to_transform": None,
                "layers_pattern": None, "init_weights": True}
