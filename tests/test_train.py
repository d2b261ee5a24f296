"""The training pipeline on tiny-llama: run directory, resume after SIGKILL, divergence and
impl=peft. Data parallel (equal to one process, through a SIGTERM and a resume) is tested in
test_preemption.py, sharded training in test_fsdp.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import peftkit
from peftkit.data import data_root
from peftkit.errors import ConfigError
from peftkit.recipe import load_recipe
from peftkit.train import train
from peftkit.trainer import TrainingDiverged

ALPACA = str(data_root() / "alpaca" / "alpaca_5000.json")


def write_recipe(tmp_path: Path, **sections) -> Path:
    recipe = {
        "model": "tiny-llama", "adapter": "lora", "adapter_overrides": {"dropout": 0.1},
        "data": {"train": ALPACA, "format": "alpaca", "max_length": 512, "limit": 64},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1.0e-2, "logging_steps": 2, "save_steps": 3, "seed": 7},
        "output": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) else value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def adapter_tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_run_directory_layout(tmp_path):
    run = train(load_recipe(str(write_recipe(tmp_path))))
    assert {p.name for p in run.iterdir()} >= {"recipe.yaml", "adapter", "checkpoints", "metrics.jsonl", "system.json"}
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 4, 6]
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_mb", "epoch"} <= line.keys() for line in lines)
    system = json.loads((run / "system.json").read_text())
    assert system["steps"] == 6 and system["tokens_per_s"] > 0 and system["versions"]["trl"]
    assert [p.name for p in (run / "checkpoints").iterdir()] and all(
        p.name.startswith("checkpoint-") for p in (run / "checkpoints").iterdir())
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["train"]["max_steps"] == 6 and resolved["train"]["scheduler"] == "cosine"
    card = (run / "adapter" / "README.md").read_text()
    assert "CC BY-NC 4.0" not in card  # trained from a path, not the named alpaca set
    model = peftkit.load_adapter(peftkit.load_model("tiny-llama")[0], run / "adapter")
    assert peftkit.trainable_parameters(model)[0] > 0


def test_existing_output_is_never_overwritten(tmp_path):
    recipe = load_recipe(str(write_recipe(tmp_path)))
    Path(recipe.output).mkdir()
    (Path(recipe.output) / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="--overwrite"):
        train(recipe)
    assert (Path(recipe.output) / "precious.txt").read_text() == "keep me"


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    recipe = load_recipe(str(write_recipe(tmp_path)))
    calls = {"n": 0}

    def poisoned_model(*args, **kwargs):
        model, tok = peftkit.load_model(*args, **kwargs)

        def poison(module, inputs, output):  # the 5th forward (step 5) produces NaN hidden states
            calls["n"] += 1
            return output * float("nan") if calls["n"] >= 5 else output

        model.model.norm.register_forward_hook(poison)
        return model, tok

    monkeypatch.setattr("peftkit.train.load_model", poisoned_model)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingDiverged, match="loss became nan at step 5; last good checkpoint: .*checkpoint-3"):
        train(recipe)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # Ctrl-C works again after a failed run
    assert (Path(recipe.output) / "checkpoints" / "checkpoint-3" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (Path(recipe.output) / "adapter").exists()


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "peftkit", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    path = write_recipe(tmp_path, train={"max_steps": 60, "save_steps": 5, "logging_steps": 5})
    straight = tmp_path / "straight"
    proc = run_cli("train", str(path), f"output={straight}")
    assert proc.wait(timeout=600) == 0, proc.stderr.read()

    killed = tmp_path / "killed"
    proc = run_cli("train", str(path), f"output={killed}")
    deadline = time.time() + 300
    while not list((killed / "checkpoints").glob("checkpoint-1*")) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "the run finished before it was killed"
    resumed = run_cli("train", str(path), f"output={killed}", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    assert max_diff(adapter_tensors(straight), adapter_tensors(killed)) <= 1e-5


def test_peft_backend_trains_same_preset(tmp_path):
    ours = train(load_recipe(str(write_recipe(tmp_path)), ["adapter_overrides.dropout=0.0",
                                                             f"output={tmp_path / 'ours'}"]))
    theirs = train(load_recipe(str(write_recipe(tmp_path)), ["impl=peft", "adapter_overrides.dropout=0.0",
                                                               f"output={tmp_path / 'theirs'}",
                                                               "eval.tasks=alpaca-heldout,sst2", "eval.limit=4"]))
    loss = lambda run: [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert json.loads((theirs / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert set(json.loads((theirs / "eval.json").read_text())["tasks"]) == {"alpaca-heldout", "sst2"}
    # different random initialisations of A, same data and schedule: both learn, curves are close
    assert loss(ours)[-1] < loss(ours)[0] and loss(theirs)[-1] < loss(theirs)[0]
