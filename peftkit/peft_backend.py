"""`impl: peft`: the same adapter preset through Hugging Face peft, for side-by-side reports.

peft is imported here only, inside functions: peftkit's own adapters never use it.
"""

from pathlib import Path
from typing import Any

from torch import nn

from peftkit.errors import ConfigError
from peftkit.lora import LoRAConfig


def apply_peft(model: nn.Module, cfg: Any) -> nn.Module:
    """Wrap `model` with peft's version of the peftkit config `cfg`."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("impl: peft needs the peft package: pip install peft (or pip install -e '.[dev]')") from None
    if type(cfg) is LoRAConfig:
        peft_cfg = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                              use_rslora=cfg.rslora, use_dora=cfg.dora, task_type="CAUSAL_LM",
                              init_lora_weights="gaussian" if cfg.init == "gaussian" else True)
        return get_peft_model(model, peft_cfg)
    raise ConfigError(f"impl: peft is not available for method {cfg.method!r} yet: use impl: peftkit")


def save_peft(model: nn.Module, directory: Path) -> None:
    model.save_pretrained(str(directory), safe_serialization=True)


def load_peft_weights(model: nn.Module, directory: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(Path(directory) / "adapter_model.safetensors"))


def count_peft(model: nn.Module) -> tuple[int, int]:
    return model.get_nb_trainable_parameters()
