"""LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models", section 3):
B's learning rate is `ratio` times A's, since with equal rates B learns too slowly at large width.

Groups as peft's `create_loraplus_optimizer`: `lora_B` and every 1-D trainable tensor (DoRA's
magnitude, a head's bias) at lr * ratio, the rest (A, a head's weight) at lr; weight decay
except on biases and normalisation weights.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names


def loraplus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups: A at `lr`, B (and 1-D tensors) at `lr * ratio`."""
    decay = {name for name in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in name}
    slow, fast, fast_no_decay = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_B" in name or param.ndim == 1:
            (fast if name in decay else fast_no_decay).append(param)
        else:
            slow.append(param)
    return [{"params": slow, "weight_decay": weight_decay, "lr": lr},
            {"params": fast, "weight_decay": weight_decay, "lr": lr * ratio},
            {"params": fast_no_decay, "weight_decay": 0.0, "lr": lr * ratio}]


def loraplus_optimizer(ratio: float, impl: str = "peftkit") -> Callable[[nn.Module, TrainingArguments], torch.optim.Optimizer]:
    """A factory for the Trainer: the run's optimizer (AdamW) over LoRA+'s groups, ours or peft's."""

    def build(model: nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        kwargs = {k: v for k, v in kwargs.items() if k != "lr"}
        if impl == "peft":
            from peft.optimizers import create_loraplus_optimizer

            return create_loraplus_optimizer(model, optimizer_cls, lr=args.learning_rate, loraplus_lr_ratio=ratio,
                                             loraplus_weight_decay=args.weight_decay, **kwargs)
        return optimizer_cls(loraplus_param_groups(model, args.learning_rate, ratio, args.weight_decay), **kwargs)

    return build
