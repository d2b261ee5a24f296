"""Sharded training (train.distributed: fsdp, FSDP2 over 2 gloo processes) on tiny-llama: LoRA,
DoRA and QLoRA equal one process at the same global batch, the 4-bit base is sharded, and
checkpoints resume into another process count (2 -> 1, and 1 -> 2 through the shipped accelerate
FSDP config)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file
from test_train import adapter_tensors, max_diff, run_cli, write_recipe

import peftkit
from peftkit.errors import ConfigError
from peftkit.nf4 import Linear4bit
from peftkit.sharding import SHARDED_4BIT
from peftkit.recipe import load_recipe
from peftkit.train import train

ROOT = Path(__file__).resolve().parent.parent
TRAIN = {"max_steps": 6, "batch_size": 4, "save_steps": 3, "save_total_limit": 3}
FSDP = ["train.batch_size=2", "train.distributed=fsdp", "--nproc", "2"]  # the same global batch of 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One-process runs (batch 4), by adapter preset, trained once."""
    runs = {}

    def run(adapter: str) -> tuple[Path, Path]:
        if adapter not in runs:
            tmp = tmp_path_factory.mktemp(adapter)
            path = write_recipe(tmp, adapter=adapter, adapter_overrides={"dropout": 0.0, "r": 4}, train=TRAIN)
            runs[adapter] = (path, train(load_recipe(str(path), [f"output={tmp / 'one'}"])))
        return runs[adapter]

    return run


def fsdp_run(path: Path, out: Path, *extra: str) -> dict:
    proc = run_cli("train", str(path), f"output={out}", *FSDP, *extra)
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    return json.loads((out / "system.json").read_text())


def copy_run(run: Path, to: Path, keep_step: int) -> Path:
    """The run as if it had stopped after checkpoint-`keep_step`, at a new path."""
    shutil.copytree(run, to)
    shutil.rmtree(to / "adapter")
    for checkpoint in (to / "checkpoints").iterdir():
        if checkpoint.name != f"checkpoint-{keep_step}":
            shutil.rmtree(checkpoint)
    recipe = yaml.safe_load((to / "recipe.yaml").read_text())
    (to / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "output": str(to)}))
    return to / "recipe.yaml"


def test_fsdp_lora_equals_one_process_and_resumes_across_process_counts(reference, tmp_path):
    path, one = reference("lora")
    system = fsdp_run(path, tmp_path / "two")
    assert system["distributed"] == "fsdp" and system["world_size"] == 2
    assert len(system["peak_memory_mb_per_process"]) == 2
    assert max_diff(adapter_tensors(one), adapter_tensors(tmp_path / "two")) <= 1e-5
    # the checkpoint written from the sharded model holds whole tensors, as one process writes them
    for name in ("trainable.safetensors", "adapter/adapter_model.safetensors"):
        saved = [load_file(run / "checkpoints" / "checkpoint-3" / name) for run in (one, tmp_path / "two")]
        assert max_diff(*saved) <= 1e-5
    assert json.loads((tmp_path / "two" / "checkpoints" / "checkpoint-3" / "layout.json").read_text()) == {
        "processes": 2, "batch_size": 2, "grad_accum": 1, "distributed": "fsdp"}

    # 2 sharded processes -> 1 process (batch 4 keeps the global batch)
    resumed = copy_run(tmp_path / "two", tmp_path / "two-to-one", keep_step=3)
    train(load_recipe(str(resumed), ["train.batch_size=4"]), resume=True)
    assert max_diff(adapter_tensors(one), adapter_tensors(tmp_path / "two-to-one")) <= 1e-5

    # 1 process -> 2 sharded processes, launched with the shipped accelerate FSDP config (whose
    # mixed_precision bf16 gives way to the recipe's fp32)
    resumed = copy_run(one, tmp_path / "one-to-two", keep_step=3)
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "recipes" / "accelerate" / "fsdp.yaml"), "-m", "peftkit", "train", str(resumed),
                           "train.batch_size=2", "--resume"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    system = json.loads((tmp_path / "one-to-two" / "system.json").read_text())
    assert system["distributed"] == "fsdp" and system["world_size"] == 2
    assert max_diff(adapter_tensors(one), adapter_tensors(tmp_path / "one-to-two")) <= 1e-5


@pytest.mark.parametrize("adapter", ["dora", "qlora"])
def test_fsdp_dora_and_qlora_equal_one_process(reference, tmp_path, adapter):
    path, one = reference(adapter)
    system = fsdp_run(path, tmp_path / "two")
    assert max_diff(adapter_tensors(one), adapter_tensors(tmp_path / "two")) <= 1e-5
    single = json.loads((one / "system.json").read_text())
    assert all(b < 0.6 * single["model_bytes_per_process"][0] for b in system["model_bytes_per_process"])
    if adapter == "qlora":  # each process holds half of the 4-bit codes and block scales (the rest is small)
        whole = single["quantized_base_bytes"]
        assert single["quantized_base_bytes_per_process"] == [whole]
        assert all(b <= whole - sharded_4bit_bytes() / 2 for b in system["quantized_base_bytes_per_process"])


def sharded_4bit_bytes() -> int:
    """Bytes of the 4-bit tensors FSDP shards (packed codes, block scales) in tiny-llama's 4-bit base."""
    model, _ = peftkit.load_model("tiny-llama", quantize="nf4")
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    return sum(getattr(layer, name).nbytes for layer in layers for name in SHARDED_4BIT)


def test_resume_needs_the_same_global_batch(reference, tmp_path):
    _, one = reference("lora")
    resumed = copy_run(one, tmp_path / "other", keep_step=3)
    with pytest.raises(ConfigError, match=r"global batch of 4 .* this run's is 2: set train.batch_size=4"):
        train(load_recipe(str(resumed), ["train.batch_size=2"]), resume=True)


@pytest.mark.parametrize(("args", "env", "message"), [
    (["train.distributed=fsdp", "impl=peft", "--nproc", "2"], {}, "impl: peft trains with train.distributed: ddp"),
    (["train.distributed=fsdp", "adapter=adalora", "--nproc", "2"], {}, "adalora's rank allocator reads whole layers"),
    ([], {"ACCELERATE_USE_DEEPSPEED": "true"}, "shard with train.distributed: fsdp"),  # as `accelerate launch` sets it
])
def test_what_cannot_be_sharded_is_one_line(tmp_path, args, env, message):
    proc = run_cli("train", str(write_recipe(tmp_path)), *args, env_extra=env)
    assert proc.wait(timeout=300) == 1
    lines = proc.stderr.read().strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
