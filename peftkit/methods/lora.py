"""LoRA (Hu et al., 2021), rsLoRA (Kalajdzievski, 2023) and DoRA (Liu et al., 2024), from scratch.

    y = base(x) + B(A(dropout(x))) * scale,   scale = alpha / r   (rsLoRA: alpha / sqrt(r))

A is kaiming-uniform (or gaussian), B is zero, so a fresh adapter leaves the model unchanged.
DoRA splits the adapted weight into a trained magnitude m (one value per output row) and a
direction:  W' = m * (W + scale * B A) / ||W + scale * B A||_row.  As in the DoRA paper
(section 4.3) the norm is treated as a constant in backward.

GPT-2's `Conv1D` layers store their weight transposed, (in, out); LoRA wraps them unchanged (A is
(r, in), B is (out, r), as for `nn.Linear`) and merges B A transposed: peft's `fan_in_fan_out`.

Parameter names follow peft (`lora_A.weight`, `lora_B.weight`, `lora_magnitude_vector`), so
the saved state dict needs no renaming beyond peft's `base_model.model.` prefix.

Initialisations from the base weight W (out, in), each starting where the base model is:
- `pissa` (Meng et al., 2024): W = U S V^T; B = U_r sqrt(S_r / scale), A = sqrt(S_r / scale) V_r^T,
  and the base keeps the residual W - scale * B A.
- `olora` (Buyukakyuz, 2024): W = Q R; B = Q_:r, A = R_r:, the base keeps W - scale * B A.
- `loftq` (Li et al., 2024, algorithm 1), with a 4-bit base: T times, Q_t = NF4(W - scale * B A),
  then B A = the rank-r SVD of (W - Q_t) / scale; the base holds Q_T, so base plus adapter starts
  nearer W than QLoRA's NF4(W) alone.
PiSSA and OLoRA move the base, so a saved adapter is converted to plain LoRA on the original
weights, as peft's `path_initial_model_for_weight_conversion` does: B A - B0 A0 as rank 2r,
[B, -B0] [A; A0], with alpha doubled to keep the scale.
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.errors import AdapterError, ConfigError
from peftkit.nf4 import BLOCKSIZES, Linear4bit
from peftkit.targets import ALL_LINEAR, family_targets, find_targets, replace_module

INITS = ("default", "gaussian", "pissa", "olora", "loftq")
BASE_INITS = ("pissa", "olora")  # initialisations that move the base weight (saved converted to plain LoRA)


class _DroppedLoRA(torch.autograd.Function):
    """result + scale * dropout(x) A^T B^T, keeping one byte per input element for backward.

    Note:
        Autograd through `F.dropout` keeps the dropout's float noise and its float output (the
        input of A) alive until backward: 8 bytes per input element and adapted layer, with
        all-linear targets and r = 64 more than the 4-bit base weights themselves. This function
        keeps x (one tensor shared by the layers that read it: q, k and v; gate and up), the
        boolean mask and the rank-r hidden, and recomputes dropout(x) = x * mask / (1 - p) in
        backward. The mask comes from `torch.native_dropout`, which draws the same random numbers
        as `F.dropout` (and so as peft's `nn.Dropout`) on CPU and CUDA: the same seed drops the
        same elements.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, result: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor,
                p: float, scale: float) -> torch.Tensor:
        dropped, mask = torch.native_dropout(x, p, True)
        hidden = F.linear(dropped, weight_a)  # (..., r)
        ctx.save_for_backward(x, mask, hidden, weight_a, weight_b)
        ctx.keep, ctx.scale = 1.0 - p, scale
        if hidden.dtype != result.dtype:
            return result + (F.linear(hidden, weight_b) * scale).to(result.dtype)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, hidden.shape[-1]),
                          weight_b.t(), alpha=scale)
        return out.view(result.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, mask, hidden, weight_a, weight_b = ctx.saved_tensors
        grad = grad_out.reshape(-1, grad_out.shape[-1]).to(weight_b.dtype)  # (tokens, out)
        hidden = hidden.reshape(-1, hidden.shape[-1])  # (tokens, r)
        grad_hidden = (grad @ weight_b) * ctx.scale  # (tokens, r)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = ((grad_hidden @ weight_a).view(x.shape) * mask / ctx.keep).to(x.dtype)
        if ctx.needs_input_grad[2]:
            dropped = (x * mask / ctx.keep).reshape(-1, x.shape[-1])  # (tokens, in)
            grad_a = grad_hidden.t() @ dropped
        if ctx.needs_input_grad[3]:
            grad_b = (grad.t() @ hidden) * ctx.scale
        grad_result = grad_out if ctx.needs_input_grad[1] else None
        return grad_x, grad_result, grad_a, grad_b, None, None


@dataclass
class LoRAConfig:
    """A LoRA or DoRA adapter, as written in an `adapters/*.yaml` preset."""

    method: ClassVar[str] = "lora"
    r: int = 8  # rank of the update B @ A
    alpha: float = 16.0  # update scale numerator: scale = alpha / r (or alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the adapter's input during training
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])  # names, a regex, or all-linear
    rslora: bool = False  # rank-stabilised scale alpha / sqrt(r)
    dora: bool = False  # weight-decomposed LoRA: train a per-row magnitude too
    init: str = "default"  # A kaiming-uniform (default) or normal(0, 1/r) (gaussian), B zeros; or pissa, olora, loftq
    loftq_iter: int = 1  # LoftQ: alternating quantise / low-rank steps (1: the base is NF4(W), as QLoRA's)
    quantize: str | None = None  # nf4: quantise the targeted base layers to 4-bit NF4 first (QLoRA)
    blocksize: int = 64  # NF4 block size (values sharing one absmax)
    double_quant: bool = True  # quantise the absmax values too (8-bit, block 256)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"r must be a positive integer, got {self.r!r}: set r to 8, 16 or 32")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ConfigError(f"alpha must be a positive number, got {self.alpha!r}: alpha = 2 * r is a common choice")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        targets = self.target_modules
        if isinstance(targets, (list, tuple)):
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ConfigError(f"target_modules must be module names, a regex or 'all-linear', got {targets!r}")
            self.target_modules = list(targets)
        elif not isinstance(targets, str) or not targets:
            raise ConfigError(f"target_modules must be module names, a regex or 'all-linear', got {targets!r}")
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init in BASE_INITS and self.quantize:
            raise ConfigError(f"init {self.init} rewrites the base weights, which a 4-bit base cannot hold: use a "
                              f"full-precision base (quantize: null), or init: loftq for QLoRA")
        if self.init == "loftq" and self.quantize != "nf4":
            raise ConfigError("init loftq initialises against a 4-bit base: set quantize: nf4 (the qlora-loftq preset)")
        if self.init in (*BASE_INITS, "loftq") and self.dora:
            raise ConfigError(f"init {self.init} is for plain LoRA: set dora: false, or init: default")
        if isinstance(self.loftq_iter, bool) or not isinstance(self.loftq_iter, int) or self.loftq_iter <= 0:
            raise ConfigError(f"loftq_iter must be a positive integer, got {self.loftq_iter!r}")
        if self.quantize not in (None, "nf4"):
            raise ConfigError(f"quantize must be nf4 or empty, got {self.quantize!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ConfigError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        for flag in ("rslora", "dora", "double_quant"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false, got {getattr(self, flag)!r}")

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


class LoRALinear(nn.Module):
    """A linear layer with a low-rank update; the frozen layer is kept as `self.base`.

    Args:
        base: the layer to adapt, an `nn.Linear` (weight (out, in)), a GPT-2 `Conv1D` (weight
            (in, out)) or a 4-bit `Linear4bit` (QLoRA); its weight is never trained.
        r, alpha, dropout, rslora, dora, init: see `LoRAConfig`.
    """

    def __init__(self, base: nn.Linear | Conv1D | Linear4bit, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 dora: bool = False, init: str = "default") -> None:
        super().__init__()
        self.base = base
        self.r = r
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        # Adapters stay in fp32 over a half-precision base, for stable updates (as peft does).
        weight_dtype, device = (base.weight_dtype, base.weight_packed.device) if isinstance(base, Linear4bit) else (
            base.weight.dtype, base.weight.device)
        dtype = torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype
        kwargs = {"bias": False, "device": device, "dtype": dtype}
        self.fan_in_fan_out = isinstance(base, Conv1D)
        in_features, out_features = base.weight.shape if self.fan_in_fan_out else (base.in_features, base.out_features)
        self.lora_A = nn.Linear(in_features, r, **kwargs)
        self.lora_B = nn.Linear(r, out_features, **kwargs)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = float(dropout)
        self.merged = False
        self._merged_norm: torch.Tensor | None = None  # DoRA: the row norm used by merge, for unmerge
        self._quantized_base: Linear4bit | None = None  # QLoRA: the 4-bit layer a merge replaced
        self.reset_parameters(init)
        self.lora_magnitude_vector = nn.Parameter(self._row_norm().detach()) if dora else None

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's stored weight (a 4-bit base: its packed codes), for model code that reads
        `layer.weight.dtype` (T5's feed-forward does), as on peft's layers."""
        return self.base.weight_packed if isinstance(self.base, Linear4bit) else self.base.weight

    @property
    def adapter_parameter_names(self) -> tuple[str, ...]:
        names = ("lora_A.weight", "lora_B.weight")
        return names + ("lora_magnitude_vector",) if self.lora_magnitude_vector is not None else names

    @torch.no_grad()
    def reset_parameters(self, init: str = "default") -> None:
        if init in BASE_INITS:
            return self._init_from_base(init)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def _init_from_base(self, init: str) -> None:
        """PiSSA or OLoRA: A, B from W's principal directions; the base keeps W - scale * B A (peft's
        operations, in fp32). B0 and A0 are kept to convert the trained adapter to plain LoRA."""
        stored = self.base.weight
        weight = self.base_weight().to(torch.float32)  # (out, in)
        if init == "pissa":
            weight_a, weight_b = svd_factors(weight.data, self.r, self.scale)
        else:
            q, r = torch.linalg.qr(weight.data)
            weight_a, weight_b = _padded(r[: self.r].contiguous(), q[:, : self.r].contiguous(), self.r)
        residual = weight - self.scale * weight_b @ weight_a
        stored.data = self._stored(residual).to(stored.dtype)
        self.lora_A.weight.data = weight_a.to(self.lora_A.weight.dtype)
        self.lora_B.weight.data = weight_b.to(self.lora_B.weight.dtype)
        self.register_buffer("initial_A", self.lora_A.weight.detach().clone(), persistent=False)
        self.register_buffer("initial_B", self.lora_B.weight.detach().clone(), persistent=False)

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter as saved: PiSSA / OLoRA converted to plain LoRA on the original weights,
        [B, -B0] [A; A0] (rank 2r); other inits as they are."""
        tensors = {name: self.get_parameter(name) for name in self.adapter_parameter_names}
        if not hasattr(self, "initial_A"):
            return tensors
        return {**tensors, "lora_A.weight": torch.cat([self.lora_A.weight, self.initial_A], dim=0),
                "lora_B.weight": torch.cat([self.lora_B.weight, -self.initial_B], dim=1)}

    @torch.no_grad()
    def restore_base(self) -> None:
        """Unmerged PiSSA / OLoRA: give the base back its original weight, W_res + scale * B0 A0."""
        if hasattr(self, "initial_A") and not self.merged:
            weight = self.base_weight().float() + self.scale * self.initial_B.float() @ self.initial_A.float()
            self.base.weight.data = self._stored(weight).to(self.base.weight.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scale * B @ A, shape (out, in), in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scale

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as (out, in); a 4-bit base is dequantised, a Conv1D's transposed (a view)."""
        if isinstance(self.base, Linear4bit):
            return self.base.dequantized_weight()
        return self.base.weight.T if self.fan_in_fan_out else self.base.weight

    def _row_norm(self) -> torch.Tensor:
        """||W + scale * B A|| per output row, shape (out,); a constant for backward (DoRA 4.3)."""
        weight = self.base_weight().to(self.lora_A.weight.dtype)
        return torch.linalg.norm(weight + self.delta_weight().detach(), dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Note: the layers are applied as functions, not called as modules: at batch-1 decoding a
        # module call's bookkeeping costs as much as the rank-r matmuls themselves.
        base = self.base
        result = F.linear(x, base.weight, base.bias) if type(base) is nn.Linear else base(x)
        if self.merged:
            return result
        if self.lora_magnitude_vector is not None:
            return self._dora_forward(x, result)
        weight_a = self.lora_A.weight
        x = x.to(weight_a.dtype)
        if self.training and self.dropout_p > 0 and torch.is_grad_enabled():
            return _DroppedLoRA.apply(x, result, weight_a, self.lora_B.weight, self.dropout_p, self.scale)
        hidden = F.linear(x, weight_a)  # (..., r)
        if hidden.dtype == result.dtype:
            # Note: one fused GEMM adds the update into the base output (result + scale * h @ B^T):
            # no separate scale and add passes over the (tokens, out) activation in forward or backward.
            out = torch.addmm(result.reshape(-1, result.shape[-1]), hidden.reshape(-1, self.r),
                              self.lora_B.weight.t(), alpha=self.scale)
            return out.view(result.shape)
        return result + (self.lora_B(hidden) * self.scale).to(result.dtype)

    def _dora_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        x = x.to(self.lora_A.weight.dtype)
        factor = self.lora_magnitude_vector / self._row_norm()  # (out,)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            base_result = result if self.base.bias is None else result - self.base.bias
        else:
            # The direction term must see the same dropped-out input as the update.
            x = self.dropout(x)
            base_result = F.linear(x.to(result.dtype), self.base_weight().to(result.dtype))
        update = self.lora_B(self.lora_A(x))
        dora = (factor - 1) * base_result + factor * update * self.scale
        return result + dora.to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the base weight; an error if already merged.

        A 4-bit base is dequantised into a plain `nn.Linear` first (kept for unmerge): re-quantising
        W + BA would round the update away.
        """
        if self.merged:
            raise AdapterError("adapter is already merged: call unmerge_adapter first, or merge only once")
        if isinstance(self.base, Linear4bit):
            self._quantized_base = self.base
            self.base = dequantized_linear(self.base)
        weight = self.base.weight
        delta = self.delta_weight().to(torch.float32)
        if self.lora_magnitude_vector is None:
            merged = self.base_weight().float() + delta
        else:
            self._merged_norm = self._row_norm().float()
            factor = (self.lora_magnitude_vector.float() / self._merged_norm).view(-1, 1)
            merged = factor * (self.base_weight().float() + delta)
        weight.data = self._stored(merged).to(weight.dtype)
        self.merged = True

    def _stored(self, weight: torch.Tensor) -> torch.Tensor:
        """An (out, in) weight in the base layer's own layout (a Conv1D keeps (in, out))."""
        return weight.T.contiguous() if self.fan_in_fan_out else weight

    @torch.no_grad()
    def unmerge(self) -> None:
        """Exact inverse of merge up to rounding; an error if not merged."""
        if not self.merged:
            raise AdapterError("adapter is not merged: nothing to unmerge")
        weight = self.base.weight
        delta = self.delta_weight().to(torch.float32)
        if self.lora_magnitude_vector is None:
            restored = self.base_weight().float() - delta
        else:
            factor = (self.lora_magnitude_vector.float() / self._merged_norm).view(-1, 1)
            restored = self.base_weight().float() / factor - delta
            self._merged_norm = None
        weight.data = self._stored(restored).to(weight.dtype)
        if self._quantized_base is not None:  # back to the exact 4-bit layer
            self.base, self._quantized_base = self._quantized_base, None
        self.merged = False

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"r={self.r}, scale={self.scale:g}{dora}, merged={self.merged}"


def svd_factors(matrix: torch.Tensor, r: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with scale * B A the best rank-r approximation of `matrix` (out, in), the singular
    values split evenly: A = sqrt(S_r / scale) V_r^T, B = U_r sqrt(S_r / scale) (peft's PiSSA)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    s_r = s[:r] / scale
    return _padded(torch.diag(torch.sqrt(s_r)) @ vh[:r], u[:, :r] @ torch.diag(torch.sqrt(s_r)), r)


def _padded(weight_a: torch.Tensor, weight_b: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (k, in), B (out, k) grown to rank r with zero rows and columns, where r exceeds min(out, in) = k."""
    k = weight_a.shape[0]
    if k == r:
        return weight_a, weight_b
    return (torch.cat([weight_a, weight_a.new_zeros(r - k, weight_a.shape[1])]),
            torch.cat([weight_b, weight_b.new_zeros(weight_b.shape[0], r - k)], dim=1))


@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, scale: float, iterations: int,
          round_trip) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoftQ (Li et al., 2024, algorithm 1): T times, Q_t = round_trip(W - scale * B A), then
    scale * B A = the rank-r SVD of W - Q_t. Returns (the weight whose 4-bit round trip is Q_T,
    A, B). peft factors the SVD as B A without the scale, so its start equals this one only
    when alpha = r."""
    weight = weight.to(torch.float32)
    residual = weight
    for step in range(iterations):
        quantized = round_trip(residual)
        weight_a, weight_b = svd_factors(weight - quantized, r, scale)
        if step + 1 < iterations:
            residual = weight - scale * weight_b @ weight_a
    return residual, weight_a, weight_b


def dequantized_linear(layer: Linear4bit) -> nn.Linear:
    """A plain `nn.Linear` holding a 4-bit layer's dequantised weight (and its bias)."""
    weight = layer.dequantized_weight()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    linear.weight.data = weight
    if layer.bias is not None:
        linear.bias.data = layer.bias.data.to(weight.dtype)
    linear.requires_grad_(False)
    return linear


class LoRAMethod:
    """LoRA/DoRA answering the adapter protocol (see `peftkit.protocol.AdapterMethod`)."""

    name = "lora"
    mergeable = True  # merge folds the update into the base weights
    padding_free = True
    peft_type = "LORA"
    config_class = LoRAConfig
    module_class = LoRALinear
    supported_bases: tuple[type, ...] = (nn.Linear, Conv1D, Linear4bit)

    def apply(self, model: nn.Module, cfg: LoRAConfig) -> nn.Module:
        cfg.target_modules = family_targets(model, cfg.target_modules)
        names = find_targets(model, cfg.target_modules, self.supported_bases)
        if cfg.quantize == "nf4":
            from peftkit.qlora import quantize_layers

            if cfg.init == "loftq":
                return self._apply_loftq(model, cfg, names)
            quantize_layers(model, names, cfg.blocksize, cfg.double_quant)
        for name in names:
            base = model.get_submodule(name)
            replace_module(model, name, self.module_class(
                base, cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.dora, cfg.init))
        return model

    def _apply_loftq(self, model: nn.Module, cfg: LoRAConfig, names: list[str]) -> nn.Module:
        """QLoRA with LoftQ: each quantisable layer's adapter from its full-precision weight, its
        base the 4-bit codes of LoftQ's last residual; layers left in full precision start as LoRA."""
        from peftkit.nf4 import dequantize_nf4, quantize_nf4
        from peftkit.qlora import quantize_layers, will_quantize

        def round_trip(weight: torch.Tensor) -> torch.Tensor:
            return dequantize_nf4(*quantize_nf4(weight.contiguous(), cfg.blocksize, cfg.double_quant)).float()

        starts = {}
        for name in names:
            if not will_quantize(model, name, cfg.blocksize):
                continue
            base = model.get_submodule(name)
            conv = isinstance(base, Conv1D)
            weight = base.weight.T if conv else base.weight
            last, weight_a, weight_b = loftq(weight, cfg.r, cfg.scale, cfg.loftq_iter, round_trip)
            base.weight.data = (last.T.contiguous() if conv else last).to(base.weight.dtype)
            starts[name] = (weight_a, weight_b)
        quantize_layers(model, names, cfg.blocksize, cfg.double_quant)
        for name in names:
            layer = self.module_class(model.get_submodule(name), cfg.r, cfg.alpha, cfg.dropout, cfg.rslora, cfg.dora)
            if name in starts:
                layer.lora_A.weight.data, layer.lora_B.weight.data = (
                    t.to(layer.lora_A.weight.dtype) for t in starts[name])
            replace_module(model, name, layer)
        return model

    def merge(self, model: nn.Module) -> None:
        modules = self.modules(model)
        if any(m.merged for m in modules):
            raise AdapterError("adapter is already merged: call unmerge_adapter first, or merge only once")
        for module in modules:
            module.merge()

    def unmerge(self, model: nn.Module) -> None:
        modules = self.modules(model)
        if not all(m.merged for m in modules):
            raise AdapterError("adapter is not merged: nothing to unmerge")
        for module in modules:
            module.unmerge()

    def unload(self, model: nn.Module) -> nn.Module:
        """Put the base layers back (merged or not), leaving a plain transformers model."""
        for name, module in list(model.named_modules()):
            if isinstance(module, LoRALinear):
                module.restore_base()
                replace_module(model, name, module.base)
        return model

    @staticmethod
    def modules(model: nn.Module) -> list[LoRALinear]:
        return [m for m in model.modules() if isinstance(m, LoRALinear)]

    def to_peft_config(self, cfg: LoRAConfig, model: nn.Module) -> dict:
        targets = cfg.target_modules
        if targets == ALL_LINEAR:  # peft saves the expanded names
            targets = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LoRALinear)})
        r, alpha, init = cfg.r, cfg.alpha, "gaussian" if cfg.init == "gaussian" else True
        if cfg.init in BASE_INITS:  # saved converted to plain LoRA of rank 2r (saved_tensors), at the same scale
            r, alpha = 2 * r, alpha * (math.sqrt(2) if cfg.rslora else 2)
        extra = {}
        if cfg.quantize:
            quantization = {"quant_type": "nf4", "blocksize": cfg.blocksize, "double_quant": cfg.double_quant}
            if cfg.init == "loftq" and cfg.loftq_iter > 1:  # the base is LoftQ's, not NF4(W): loaders replay it
                quantization["loftq_iter"] = cfg.loftq_iter
                init, extra = "loftq", {"loftq_config": {"loftq_bits": 4, "loftq_iter": cfg.loftq_iter}}
            extra["peftkit"] = {"base_quantization": quantization}
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
            "lora_dropout": cfg.dropout, "target_modules": targets, "use_rslora": cfg.rslora,
            "use_dora": cfg.dora, "init_lora_weights": init,
            "bias": "none", "fan_in_fan_out": any(m.fan_in_fan_out for m in self.modules(model)),
            "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
        } | extra

    def from_peft_config(self, peft: dict) -> LoRAConfig:
        unsupported = {
            "bias": ("none", None),
            "layers_to_transform": (None, []), "rank_pattern": ({}, None), "alpha_pattern": ({}, None),
            "target_parameters": (None, []), "lora_bias": (False, None), "use_qalora": (False, None),
            "trainable_token_indices": (None,), "layer_replication": (None,), "exclude_modules": (None, []),
        }
        for key, allowed in unsupported.items():
            if peft.get(key, allowed[0]) not in allowed:
                raise AdapterError(f"adapter_config.json sets {key}={peft[key]!r}, which peftkit does not support: "
                                   f"re-save the adapter without it")
        init = peft.get("init_lora_weights", True)
        quantization = (peft.get("peftkit") or {}).get("base_quantization") or {}
        if str(init).startswith("pissa_niter"):  # a randomised SVD: the residual base cannot be rebuilt exactly
            raise AdapterError(f"this adapter was saved with init_lora_weights={init!r}: save it converted to plain "
                               f"LoRA (peft's path_initial_model_for_weight_conversion) and load that")
        loftq_iter = quantization.get("loftq_iter", 1)
        if init == "loftq" and not quantization:
            raise AdapterError("this LoftQ adapter has no peftkit base_quantization record: load it with peft, "
                               "which rebuilds its base")
        return LoRAConfig(
            # peft's own PiSSA / OLoRA adapters: the residual base is rebuilt from W, as peft does on load
            init=init if init in BASE_INITS else "loftq" if loftq_iter > 1 else "gaussian" if init == "gaussian"
            else "default", loftq_iter=loftq_iter,
            quantize="nf4" if quantization.get("quant_type") == "nf4" else None,
            blocksize=quantization.get("blocksize", 64), double_quant=quantization.get("double_quant", True),
            r=peft["r"], alpha=peft.get("lora_alpha", 8), dropout=peft.get("lora_dropout", 0.0),
            target_modules=peft["target_modules"], rslora=bool(peft.get("use_rslora", False)),
            dora=bool(peft.get("use_dora", False)))
