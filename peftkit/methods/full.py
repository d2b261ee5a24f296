"""Full fine-tuning: every parameter of the base model trains; no adapter at all.

It is the yardstick the PEFT papers report against (LoRA's Table 2, Chen et al. 2022), so a
study lists it like any method (`methods: {full: {adapter: full}}`) and its parameters, peak
memory, time and checkpoint size are what the PEFT methods' savings are measured from.

It answers the registry, not the adapter protocol: there is nothing to inject, merge or save in
peft's format. `peftkit train` with `adapter: full` unfreezes the model itself
(`peftkit.train.attach_adapter`) and saves a plain transformers model directory (`model/` in the
run directory, loadable with no peftkit installed); checkpoints, resume and eval work as for any run.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from peftkit.errors import AdapterError

NO_ADAPTER = ("full fine-tuning has no adapter: it trains the model itself (peftkit train with adapter: full "
              "saves a plain model in <run>/model)")


@dataclass
class FullConfig:
    """Full fine-tuning, as written in `adapters/full.yaml`: no fields, every parameter trains."""

    method: ClassVar[str] = "full"


class FullMethod:
    """Registered so recipes, presets and reports name it; every adapter operation says why not."""

    name = "full"
    peft_type = "FULL"
    config_class = FullConfig
    mergeable = False
    padding_free = True  # the plain model sees only its own tokens: packed rows are fine

    def apply(self, model: nn.Module, cfg: Any) -> nn.Module:
        raise AdapterError(f"{NO_ADAPTER}; apply_adapter injects adapters only")

    def merge(self, model: nn.Module) -> None:
        raise AdapterError(f"{NO_ADAPTER}: there is nothing to merge")

    def unmerge(self, model: nn.Module) -> None:
        raise AdapterError(f"{NO_ADAPTER}: there is nothing to unmerge")

    def unload(self, model: nn.Module) -> nn.Module:
        return model

    def to_peft_config(self, cfg: Any, model: nn.Module) -> dict:
        raise AdapterError(f"{NO_ADAPTER}: it has no peft adapter_config.json")

    def from_peft_config(self, peft: dict) -> Any:
        raise AdapterError(f"{NO_ADAPTER}: no peft config describes it")


def unfreeze(model: nn.Module) -> nn.Module:
    """Every parameter of the model trains (tied weights are one parameter, trained once)."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def saved_dir(run_dir: Path, method: str | None = None) -> Path:
    """Where a run directory keeps what it trained: `model/` (full fine-tuning: a plain
    transformers model) or `adapter/`. `method`: the run's, when known; else the one on disk."""
    if method is not None:
        return run_dir / ("model" if method == "full" else "adapter")
    return run_dir / "model" if (run_dir / "model" / "config.json").is_file() else run_dir / "adapter"


def save_model(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """A plain transformers model directory (safetensors, config, tokenizer), written aside and
    renamed into place, so a crash never leaves half a model."""
    import shutil

    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
