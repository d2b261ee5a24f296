"""Training in several processes: what runs sharded (`train.distributed`), how a resume may
split the same global batch differently, the launcher's precision, and per-process figures."""

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState

from peftkit.errors import ConfigError
from peftkit.methods import METHODS
from peftkit.recipe import Recipe

logger = logging.getLogger(__name__)

LAYOUT_FILE = "layout.json"  # in each checkpoint: how its global batch was split over processes
LAYOUT = ("batch_size", "grad_accum", "distributed")  # train keys a resume may change (same global batch)


def check_layout(checkpoint: Path, recipe: Recipe, processes: int) -> None:
    """A resume may change the process count, DDP / FSDP and how the global batch is split, as long
    as the global batch (batch_size x grad_accum x processes) is the checkpoint's: then the steps
    and the data order are the same.

    Raises:
        ConfigError: another global batch than the checkpoint's.
    """
    path, t = checkpoint / LAYOUT_FILE, recipe.train
    if path.is_file():
        saved = json.loads(path.read_text())
    else:  # a checkpoint of an older peftkit: the saved recipe's split, in as many processes as now
        train = yaml.safe_load((checkpoint.parent.parent / "recipe.yaml").read_text())["train"]
        saved = {"processes": processes, "batch_size": train["batch_size"], "grad_accum": train["grad_accum"]}
    before = saved["batch_size"] * saved["grad_accum"] * saved["processes"]
    now = t.batch_size * t.grad_accum * processes
    if now != before:
        split = t.grad_accum * processes
        fix = (f"set train.batch_size={before // split}" if before % split == 0 else
               f"make train.batch_size x grad_accum x processes {before}")
        raise ConfigError(f"--resume: {checkpoint.name} was trained at a global batch of {before} (train.batch_size "
                          f"{saved['batch_size']} x grad_accum {saved['grad_accum']} x {saved['processes']} "
                          f"process(es)), this run's is {now}: {fix}")


def without_layout(recipe: dict) -> dict:
    train = {k: v for k, v in (recipe.get("train") or {}).items() if k not in LAYOUT}
    return {**recipe, "train": train}


def adopt_launcher(recipe: Recipe) -> None:
    """What `accelerate launch` set for this run, taken into the recipe. Its FSDP config selects
    `train.distributed: fsdp`; peftkit then shards by itself, so accelerate is told not to plan
    FSDP too (on GPUs its plugin would take over the Trainer's saving). The recipe's
    `train.precision` wins over the launcher's mixed precision (the shipped configs say bf16, for
    GPUs); a difference is logged."""
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        recipe.train.distributed = "fsdp"
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")
    dtype = train_dtype(recipe.train.precision)
    ours = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")
    if launcher is not None and launcher != ours:
        logger.info("train.precision %s: training in %s, not the launcher's mixed_precision %s (set train.precision to "
                    "change it)", recipe.train.precision, dtype, launcher)
        os.environ["ACCELERATE_MIXED_PRECISION"] = ours


def check_distributed(recipe: Recipe, adapter_cfg: Any) -> None:
    """What sharded training runs, checked before any process loads a model.

    Raises:
        ConfigError: a DeepSpeed launch; FSDP with impl: peft, or with a method whose allocator reads
            whole layers (AdaLoRA).
    """
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if recipe.selection.metric and processes > 1:
        raise ConfigError(f"selection: the dev split is scored during training in one process, and this run has "
                          f"{processes}: drop --nproc or the selection (tune) section")
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ConfigError("DeepSpeed: peftkit's checkpoints (safetensors + JSON, exact resume) cannot hold the "
                          "DeepSpeed engine's own pickled optimizer state: shard with train.distributed: fsdp "
                          "(FSDP2, parameters, gradients and optimizer state sharded as in ZeRO-3)")
    if recipe.train.distributed != "fsdp":
        return
    if recipe.impl == "peft":
        raise ConfigError("train.distributed: fsdp shards peftkit's own adapters; impl: peft trains with "
                          "train.distributed: ddp")
    if adapter_cfg.method == "full":
        raise ConfigError("train.distributed: fsdp: adapter: full saves a whole transformers model, which peftkit "
                          "does not gather from shards yet: train it with train.distributed: ddp")
    if hasattr(METHODS[adapter_cfg.method], "allocator"):
        raise ConfigError(f"train.distributed: fsdp: {adapter_cfg.method}'s rank allocator reads whole layers "
                          f"each step, which FSDP shards: use train.distributed: ddp")


def per_process(state: PartialState, value: Any) -> list:
    """Each process's value, in rank order (a collective under data parallel)."""
    if state.num_processes == 1:
        return [value]
    values = [None] * state.num_processes
    torch.distributed.all_gather_object(values, value)
    return values


def train_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
