"""LoKr (Yeh et al., 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
Model Evaluation", section 3; as in LyCORIS), from scratch.

    delta W = scale * kron(W1, W2),   scale = alpha / r,   y = base(x) + x @ delta W^T

out = a * b and in = c * d are each split into two factors (`factorization`: the pair closest
to the square root, or one factor equal to `decompose_factor`); W1 is (a, c), W2 is (b, d).
W2 is a rank-r product W2a W2b when r < max(b, d) / 2, else a full matrix; W1 likewise with
`decompose_both`. W1 (or W1a) starts at zero, so a fresh adapter changes nothing
(`init: lycoris` zeros W2 / W2b instead, as LyCORIS). Parameter names are peft's.
"""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftkit.errors import ConfigError
from peftkit.methods.layer import adapter_factory, check_flags
from peftkit.methods.lycoris import LycorisConfig, LycorisLinear, LycorisMethod, lycoris_fields

INITS = ("default", "lycoris")


@dataclass
class LoKrConfig(LycorisConfig):
    """A LoKr adapter, as written in an `adapters/*.yaml` preset (r: the rank of a factor that is decomposed)."""

    method: ClassVar[str] = "lokr"
    decompose_both: bool = False  # also write W1 as a rank-r product (when r < max(a, c) / 2)
    decompose_factor: int = -1  # split dimensions with this factor; -1: the factors closest to the square root
    rank_dropout_scale: bool = False  # rescale the rows rank dropout keeps by 1 / their mean
    init: str = "default"  # default: W1 zeros; lycoris: W2 zeros

    def __post_init__(self) -> None:
        super().__post_init__()
        check_flags(self, "decompose_both", "rank_dropout_scale")
        if isinstance(self.decompose_factor, bool) or not isinstance(self.decompose_factor, int) or (
                self.decompose_factor < 1 and self.decompose_factor != -1):
            raise ConfigError(f"decompose_factor must be -1 or a positive integer, got {self.decompose_factor!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n), m <= n, m * n = dimension: m = factor when it divides the dimension, else the
    divisor pair with the smallest sum whose smaller side is at most `factor` (LyCORIS' rule)."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    factor = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


class LoKrLinear(LycorisLinear):
    """A linear layer with a LoKr update (see the module docstring)."""

    rescale_rank_dropout = False

    def __init__(self, base: nn.Linear, r: int, alpha: float, rank_dropout: float = 0.0, module_dropout: float = 0.0,
                 decompose_both: bool = False, decompose_factor: int = -1, rank_dropout_scale: bool = False,
                 init: str = "default") -> None:
        super().__init__(base, r, alpha, rank_dropout, module_dropout)
        self.rescale_rank_dropout = rank_dropout_scale
        (a, b), (c, d) = factorization(self.out_features, decompose_factor), factorization(self.in_features, decompose_factor)
        shapes = {}
        if decompose_both and r < max(a, c) / 2:
            shapes |= {"lokr_w1_a": (a, r), "lokr_w1_b": (r, c)}
        else:
            shapes["lokr_w1"] = (a, c)
        if r < max(b, d) / 2:
            shapes |= {"lokr_w2_a": (b, r), "lokr_w2_b": (r, d)}
        else:
            shapes["lokr_w2"] = (b, d)
        zero = ("lokr_w2", "lokr_w2_b") if init == "lycoris" else ("lokr_w1", "lokr_w1_a")
        for name, shape in shapes.items():
            values = torch.zeros(shape)
            if name not in zero:
                nn.init.kaiming_uniform_(values, a=math.sqrt(5))
            setattr(self, name, nn.Parameter(adapter_factory(base, values)))
        self.adapter_parameter_names = tuple(shapes)

    def _factor(self, which: str) -> torch.Tensor:
        full = getattr(self, f"lokr_{which}", None)
        return full if full is not None else getattr(self, f"lokr_{which}_a") @ getattr(self, f"lokr_{which}_b")

    def delta_weight(self) -> torch.Tensor:
        return torch.kron(self._factor("w1"), self._factor("w2").contiguous()) * self.scale  # (a*b, c*d) = (out, in)


class LoKrMethod(LycorisMethod):
    """LoKr answering the adapter protocol."""

    name = "lokr"
    peft_type = "LOKR"
    config_class = LoKrConfig
    module_class = LoKrLinear

    def build(self, base: nn.Linear, cfg: LoKrConfig, name: str, model: nn.Module) -> LoKrLinear:
        return LoKrLinear(base, cfg.r, cfg.alpha, cfg.rank_dropout, cfg.module_dropout, cfg.decompose_both,
                          cfg.decompose_factor, cfg.rank_dropout_scale, cfg.init)

    def peft_fields(self, cfg: LoKrConfig, model: nn.Module) -> dict:
        return super().peft_fields(cfg, model) | {
            "use_effective_conv2d": False, "decompose_both": cfg.decompose_both, "decompose_factor": cfg.decompose_factor,
            "rank_dropout_scale": cfg.rank_dropout_scale, "init_weights": "lycoris" if cfg.init == "lycoris" else True}

    def from_peft_config(self, peft: dict) -> LoKrConfig:
        return LoKrConfig(**lycoris_fields(peft), decompose_both=bool(peft.get("decompose_both", False)),
                          decompose_factor=peft.get("decompose_factor", -1),
                          rank_dropout_scale=bool(peft.get("rank_dropout_scale", False)),
                          init="lycoris" if peft.get("init_weights") == "lycoris" else "default")
