"""VeRA (Kopiczko et al., 2024, "VeRA: Vector-based Random Matrix Adaptation"), from scratch.

    y = base(x) + lambda_b * (B_s (lambda_d * (A_s dropout(x))))

A (r, in_max) and B (out_max, r) are frozen random matrices shared by every adapted layer,
drawn from a seed (kaiming-uniform, as the paper's section 3.1); each layer uses the slices
A_s = A[:, :in], B_s = B[:out, :] (as peft does: one pair sized to the largest layer) and
trains two vectors only, lambda_d (r,) and lambda_b (out,). lambda_b starts at zero, so a
fresh adapter changes nothing. A and B are saved beside the vectors (`base_model.vera_A`,
`base_model.vera_B`, peft's `save_projection`), or rebuilt from the seed on load.
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.errors import ConfigError
from peftkit.methods.layer import (AdapterLayer, LayerMethod, adapter_factory, check_flags, check_number, check_positive_int,
                                   check_targets, linear_dims, reject_unsupported)
from peftkit.targets import replace_module

SHARED_PREFIX = "base_model."  # peft keeps tensors shared by all layers outside the model: base_model.vera_A


@dataclass
class VeRAConfig:
    """A VeRA adapter, as written in an `adapters/*.yaml` preset."""

    method: ClassVar[str] = "vera"
    r: int = 256  # rank of the shared random matrices
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # names, a regex, or all-linear
    projection_prng_key: int = 0  # seed of the shared matrices A and B
    save_projection: bool = True  # save A and B with the adapter (else they are rebuilt from the seed)
    dropout: float = 0.0  # dropout on the adapter's input during training
    d_initial: float = 0.1  # starting value of every lambda_d

    def __post_init__(self) -> None:
        check_positive_int("r", self.r, ": VeRA's r is large, 256 in the paper's RoBERTa runs")
        if isinstance(self.projection_prng_key, bool) or not isinstance(self.projection_prng_key, int):
            raise ConfigError(f"projection_prng_key must be an integer seed, got {self.projection_prng_key!r}")
        check_flags(self, "save_projection")
        check_number("dropout", self.dropout, 0.0, 1.0)
        check_number("d_initial", self.d_initial, -math.inf, math.inf)
        self.target_modules = check_targets(self.target_modules)


def kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """U(-b, b), b = sqrt(3) * sqrt(2) / sqrt(fan_in): He et al.'s uniform init, from a seeded generator."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class VeRAProjection(nn.Module):
    """The frozen matrices A (r, in_max) and B (out_max, r) that every VeRA layer of a model shares.

    Each layer holds this module too (one object, as peft's shared `BufferDict`), so a device
    move reaches the buffers once and all layers see it.
    """

    adapter_parameter_names = ()

    def __init__(self, r: int, in_max: int, out_max: int, seed: int, saved: bool, base: nn.Module) -> None:
        super().__init__()
        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.register_buffer("vera_A", adapter_factory(base, kaiming_uniform((r, in_max), generator)))
        self.register_buffer("vera_B", adapter_factory(base, kaiming_uniform((out_max, r), generator)))
        self.saved = saved

    def peft_buffers(self) -> dict[str, torch.Tensor]:
        return {f"{SHARED_PREFIX}vera_A": self.vera_A, f"{SHARED_PREFIX}vera_B": self.vera_B} if self.saved else {}


class VeRALinear(AdapterLayer):
    """A linear layer with VeRA's update through the shared projection (see the module docstring)."""

    adapter_parameter_names = ("vera_lambda_b", "vera_lambda_d")

    def __init__(self, base: nn.Module, projection: VeRAProjection, dropout: float = 0.0, d_initial: float = 0.1) -> None:
        super().__init__(base)
        self.projection = projection
        r = projection.vera_A.shape[0]
        self.vera_lambda_b = nn.Parameter(adapter_factory(base, torch.zeros(self.out_features)))
        self.vera_lambda_d = nn.Parameter(adapter_factory(base, torch.full((r,), float(d_initial))))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _slices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A_s (r, in) and B_s (out, r): views into the shared matrices."""
        return self.projection.vera_A[:, :self.in_features], self.projection.vera_B[:self.out_features, :]

    def delta_weight(self) -> torch.Tensor:
        """diag(lambda_b) B_s diag(lambda_d) A_s, shape (out, in)."""
        a, b = self._slices()
        return (self.vera_lambda_b.unsqueeze(-1) * b) @ (self.vera_lambda_d.unsqueeze(-1) * a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_forward(x)
        if self.merged:
            return result
        a, b = self._slices()
        x = x.to(self.vera_lambda_d.dtype)
        update = self.vera_lambda_b * F.linear(self.vera_lambda_d * F.linear(self.dropout(x), a), b)
        return (result + update).to(result.dtype)

    def extra_repr(self) -> str:
        return f"r={self.projection.vera_A.shape[0]}, merged={self.merged}"


class VeRAMethod(LayerMethod):
    """VeRA answering the adapter protocol."""

    name = "vera"
    peft_type = "VERA"
    config_class = VeRAConfig
    module_class = VeRALinear

    def apply(self, model: nn.Module, cfg: VeRAConfig) -> nn.Module:
        """One projection sized to the largest targeted layer, then every layer wrapped around it."""
        names = self.target_names(model, cfg)
        bases = [model.get_submodule(name) for name in names]
        dims = [linear_dims(base) for base in bases]  # (in, out) each
        projection = VeRAProjection(cfg.r, max(d[0] for d in dims), max(d[1] for d in dims), cfg.projection_prng_key,
                                    cfg.save_projection, bases[0])
        for name, base in zip(names, bases):
            replace_module(model, name, VeRALinear(base, projection, cfg.dropout, cfg.d_initial))
        return model

    def peft_fields(self, cfg: VeRAConfig, model: nn.Module) -> dict:
        return {"r": cfg.r, "projection_prng_key": cfg.projection_prng_key, "save_projection": cfg.save_projection,
                "vera_dropout": cfg.dropout, "d_initial": cfg.d_initial, "bias": "none", "init_weights": True,
                "layers_to_transform": None, "layers_pattern": None}

    def from_peft_config(self, peft: dict) -> VeRAConfig:
        reject_unsupported(peft, {"bias": ("none", None), "layers_to_transform": (None, [])})
        return VeRAConfig(r=peft.get("r", 256), target_modules=peft["target_modules"],
                          projection_prng_key=peft.get("projection_prng_key", 0),
                          save_projection=peft.get("save_projection", True), dropout=peft.get("vera_dropout", 0.0),
                          d_initial=peft.get("d_initial", 0.1))
