"""Full fine-tuning (`adapter: full`): every base parameter trains, no adapter; the run saves a plain
transformers model directory, and checkpoints, resume and eval work as for any run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.errors import AdapterError, ConfigError
from peftkit.recipe import load_recipe
from peftkit.train import train

LR = 1.0e-3


def write_recipe(tmp_path: Path, **train_values) -> Path:
    recipe = {
        "model": "tiny-llama", "adapter": "full",
        "data": {"train": "sst2", "max_length": 512, "limit": 32},
        "train": {"max_steps": 1, "batch_size": 32, "lr": LR, "scheduler": "constant", "warmup_ratio": 0.0,
                  "max_grad_norm": 0.0, "logging_steps": 1, "save_steps": 2, "seed": 5, **train_values},
        "eval": {"tasks": ["sst2"], "limit": 8},
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_every_parameter_takes_adams_first_step_and_the_model_saves_plain(tmp_path):
    run = train(load_recipe(str(write_recipe(tmp_path))))
    base, _ = peftkit.load_model("tiny-llama")
    trained = AutoModelForCausalLM.from_pretrained(run / "model")  # transformers alone reads it
    system = json.loads((run / "system.json").read_text())
    assert system["trainable_parameters"] == system["total_parameters"] == sum(p.numel() for p in base.parameters())
    before = dict(base.named_parameters())
    for name, param in trained.named_parameters():
        moved = (param.detach() - before[name].detach()).abs()
        if "embed_tokens" in name:  # only the rows of tokens in the batch have a gradient
            moved = moved[moved.amax(dim=1) > 0]
        # Adam's first step is lr * m/sqrt(v) = lr * g/|g| (Kingma & Ba, bias-corrected): every weight with a
        # gradient moves by lr, whatever its layer, so each tensor shows that every base parameter trained
        median = torch.quantile(moved.flatten().float(), 0.5).item()
        assert moved.numel() > 0 and median == pytest.approx(LR, rel=1e-3), name
    assert (run / "model" / "tokenizer.json").is_file() and (run / "eval.json").is_file()
    assert not (run / "adapter").exists()


def test_resume_equals_an_uninterrupted_run_and_eval_reads_the_saved_model(tmp_path):
    recipe = write_recipe(tmp_path, max_steps=4, batch_size=4, scheduler="cosine")
    straight = train(load_recipe(str(recipe), [f"output={tmp_path / 'straight'}"]))
    resumed = train(load_recipe(str(recipe), [f"output={tmp_path / 'resumed'}"]))
    for leftover in ("checkpoints/checkpoint-4", "model", "system.json", "eval.json"):  # as if killed after step 2
        target = resumed / leftover
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert (resumed / "checkpoints" / "checkpoint-2" / "trainable.safetensors").is_file()
    assert not (resumed / "checkpoints" / "checkpoint-2" / "adapter").exists()  # no second copy of the model
    train(load_recipe(str(recipe), [f"output={resumed}"]), resume=True)
    ours = load_file(straight / "model" / "model.safetensors")
    theirs = load_file(resumed / "model" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    from peftkit.evaluation.command import eval_command

    report, _ = eval_command(str(straight), out=str(tmp_path / "eval.json"), use_cache=False)
    saved = json.loads((straight / "eval.json").read_text())
    assert report["adapter"] is None
    assert report["tasks"]["sst2"]["metrics"] == saved["tasks"]["sst2"]["metrics"]


def test_full_fine_tuning_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ConfigError, match="^impl: adapter: full trains the model itself"):
        load_recipe(str(write_recipe(tmp_path)), ["impl=peft"])
    model, _ = peftkit.load_model("tiny-llama")
    with pytest.raises(AdapterError, match="full fine-tuning has no adapter"):
        peftkit.apply_adapter(model, "full")
    run = tmp_path / "done"
    (run / "model").mkdir(parents=True)
    (run / "model" / "config.json").write_text("{}")
    from peftkit.merge import resolve_source

    with pytest.raises(ConfigError, match="is a full fine-tuning run: .* is already a plain transformers model"):
        resolve_source(run)
