"""`impl: peft`: the same adapter preset through Hugging Face peft (and, for QLoRA, a
bitsandbytes 4-bit base), for side-by-side reports and parity tests.

peft and bitsandbytes are imported here only, inside functions: peftkit's own adapters never
use them.
"""

import dataclasses
import logging
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.errors import ConfigError
from peftkit.targets import family_targets, quantizable_names, replace_module

logger = logging.getLogger(__name__)


def _require(package: str):
    try:
        return __import__(package)
    except ImportError:
        raise ConfigError(f"impl: peft needs the {package} package: pip install -e '.[dev]'") from None


def bnb_quantize(model: nn.Module, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """Replace every linear layer but the heads by a bitsandbytes NF4 `Linear4bit`, in place.

    GPT-2's `Conv1D` is transposed to (out, in), as transformers' bitsandbytes loader stores it.
    Weights are quantised explicitly from their full-precision values (fp32 in, fp32 quant
    state) rather than lazily on a device move, and bitsandbytes' CPU inference path, which
    repacks weights for an AVX512-BF16 kernel computing in bf16, is switched off: its fp32
    dequantise-and-matmul path is the reference (training uses it anyway).
    """
    bnb = _require("bitsandbytes")
    from transformers.pytorch_utils import Conv1D

    for name in quantizable_names(model):
        linear = model.get_submodule(name)
        weight = linear.weight.data.T if isinstance(linear, Conv1D) else linear.weight.data  # (out, in), as bnb's loader
        compute = weight.dtype
        layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=linear.bias is not None,
                                  compute_dtype=compute, compress_statistics=double_quant, quant_type="nf4",
                                  device="meta")
        packed, state = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=blocksize,
                                                     compress_statistics=double_quant, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=blocksize,
                                         compress_statistics=double_quant, quant_type="nf4", bnb_quantized=True)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        layer.support_avx512bf16_for_cpu = False
        replace_module(model, name, layer)
    return model


def peft_config(cfg: Any, model: nn.Module) -> Any:
    """peft's config for a peftkit config."""
    peft = _require("peft")
    from peftkit.models.tasks import PEFT_TASK_TYPES, task_of_model

    task_type = PEFT_TASK_TYPES[task_of_model(model)]
    if cfg.method == "lora":
        if cfg.init == "loftq":
            raise ConfigError("impl: peft cannot run LoftQ here: peft's loftq_init needs CUDA and a full-precision "
                              "base; use impl: peftkit")
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=family_targets(model, cfg.target_modules),
                               use_rslora=cfg.rslora, use_dora=cfg.dora, task_type=task_type,
                               init_lora_weights=cfg.init if cfg.init in ("gaussian", "pissa", "olora") else True)
    if cfg.method == "prefix":
        if cfg.init != "random":
            logger.warning("peft's prefix-tuning has no init from real tokens: impl: peft starts from random prefixes")
        return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=task_type,
                                       prefix_projection=cfg.prefix_projection,
                                       encoder_hidden_size=cfg.encoder_hidden_size)
    if cfg.method == "prompt":
        init = peft.PromptTuningInit.RANDOM
        if cfg.init == "tokens":
            init = peft.PromptTuningInit.TEXT if cfg.init_text else peft.PromptTuningInit.SAMPLE_VOCAB
        return peft.PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, task_type=task_type,
                                       prompt_tuning_init=init, prompt_tuning_init_text=cfg.init_text,
                                       tokenizer_name_or_path=model.config._name_or_path if cfg.init_text else None)
    from peftkit.methods import METHODS
    from peftkit.methods.layer import LayerMethod

    method = METHODS[cfg.method]
    if isinstance(method, LayerMethod):  # our saved config is peft's schema: build peft's config from it
        cfg = dataclasses.replace(cfg, target_modules=family_targets(model, cfg.target_modules))
        fields = {**method.to_peft_config(cfg, model), "task_type": task_type, "inference_mode": False}
        fields.pop("fan_in_fan_out", None)  # peft sets it per layer type
        return peft.get_peft_config(fields)
    raise ConfigError(f"impl: peft has no counterpart for method {cfg.method!r}: use impl: peftkit")


def apply_peft(model: nn.Module, cfg: Any) -> nn.Module:
    """Wrap `model` with peft's version of the peftkit config `cfg` (QLoRA: on a bitsandbytes base)."""
    peft = _require("peft")
    if getattr(cfg, "quantize", None) == "nf4":
        bnb_quantize(model, cfg.blocksize, cfg.double_quant)
    return peft.get_peft_model(model, peft_config(cfg, model))


def save_peft(model: nn.Module, directory: Path) -> None:
    """peft's own save, written aside and renamed into place (as peftkit's `save_adapter`)."""
    from peftkit.atomic import staged

    with staged(Path(directory)) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)


def load_peft_weights(model: nn.Module, directory: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(Path(directory) / "adapter_model.safetensors"))



class PeftAllocator:
    """peft's AdaLoRA rank allocator behind peftkit's allocator interface (`peftkit.trainer.AllocatorCallback`)."""

    def __init__(self, model: nn.Module, cfg: Any) -> None:
        self.model, self.cfg = model, cfg
        self.config = model.peft_config["default"]

    def begin(self, steps: int) -> None:
        if self.cfg.total_step is None:  # peft needs total_step up front: a placeholder until the run's length is known
            self.cfg.resolve(steps)
            self.config.total_step, self.config.tinit, self.config.tfinal = steps, self.cfg.tinit, self.cfg.tfinal

    def update_and_allocate(self, step: int) -> None:
        self.model.base_model.update_and_allocate(step)

    def finish(self) -> None:
        """peft keeps the regrown E in memory (its saved adapter drops them)."""

    def state(self) -> tuple[dict, dict]:
        from peftkit.methods.adalora import scores_state

        ranks = self.model.base_model.rankallocator
        return scores_state(ranks.ipt, ranks.exp_avg_ipt, ranks.exp_avg_unc), {"rank_pattern": self.config.rank_pattern}

    def load_state(self, tensors: dict, meta: dict) -> None:
        from peftkit.methods.adalora import load_scores

        ranks = self.model.base_model.rankallocator
        ranks.reset_ipt()
        load_scores(tensors, ranks.ipt, ranks.exp_avg_ipt, ranks.exp_avg_unc)
        self.config.rank_pattern = meta["rank_pattern"]


def peft_regularization(model: nn.Module):
    """peft's AdaLoRA orthogonality penalty as a loss term, for trl's SFTTrainer.

    peft adds the penalty to `outputs.loss` inside `AdaLoraModel.forward`, but trl 1.16 computes
    its loss from the model's log-probabilities and never reads `outputs.loss`: under trl the
    penalty is silently dropped. This computes it as peft does (`AdaLoraModel.forward`), so that
    impl: peft trains what peft's AdaLoRA means. Other methods: None.
    """
    config = model.peft_config["default"]
    if type(config).__name__ != "AdaLoraConfig" or config.orth_reg_weight == 0:
        return None
    from peftkit.methods.adalora import orthogonal_penalty

    def penalty(model: nn.Module):
        layers = [m for m in model.modules() if hasattr(m, "lora_E") and "default" in m.lora_A]
        return orthogonal_penalty(((m.lora_A["default"], m.lora_B["default"]) for m in layers),
                                  config.orth_reg_weight)

    return penalty


def peft_allocator(model: nn.Module, cfg: Any) -> PeftAllocator | None:
    """peft's rank allocator for an AdaLoRA run (which peft leaves to the training loop), else None."""
    return PeftAllocator(model, cfg) if cfg.method == "adalora" else None
