"""Recipes with `methods` (compare-methods): every method trains on the same mixed data, seed and
budget into its own run directory, one report covers them all, and --resume keeps finished ones."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from peftkit.compare import summarize
from peftkit.errors import ConfigError
from peftkit.recipe import load_recipe, method_recipes
from peftkit.study import train_methods


def write_study(tmp_path: Path, **extra) -> Path:
    recipe = {
        "model": "tiny-llama", "adapter": "lora",
        "data": {"train": ["sst2", "e2e"], "max_length": 512, "limit": 8},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1.0e-2, "logging_steps": 1, "save_steps": 2, "seed": 3},
        "eval": {"tasks": ["sst2"], "limit": 4},
        "output": str(tmp_path / "study"),
        "methods": {"lora": {"adapter": "lora"}, "lora-peft": {"impl": "peft"},
                    "prefix": {"adapter": "prefix", "train": {"lr": 5.0e-3}}},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_methods_share_everything_but_their_overrides(tmp_path):
    runs = method_recipes(load_recipe(str(write_study(tmp_path))))
    assert list(runs) == ["lora", "lora-peft", "prefix"]
    assert runs["lora-peft"].impl == "peft" and runs["lora"].impl == "peftkit"
    assert runs["prefix"].train.lr == 5e-3 and runs["prefix"].train.max_steps == 3  # merged, not replaced
    assert runs["lora"].train.lr == 1e-2 and runs["prefix"].output == str(tmp_path / "study" / "prefix")
    assert {run.data.sources == ["sst2", "e2e"] and run.train.seed == 3 for run in runs.values()} == {True}


def test_seeds_train_each_method_once_per_seed(tmp_path):
    study = write_study(tmp_path, seeds=[1], methods={"lora": {"seeds": [1, 2, 3]}, "prefix": {"adapter": "prefix"}})
    runs = method_recipes(load_recipe(str(study)))
    assert list(runs) == ["lora-seed1", "lora-seed2", "lora-seed3", "prefix-seed1"]
    assert [run.train.seed for run in runs.values()] == [1, 2, 3, 1]
    assert runs["lora-seed2"].output == str(tmp_path / "study" / "lora-seed2")
    for bad, why in (([1, 1], "lists a seed twice"), ("1", "seeds: expected a list"), ([-1], "whole numbers")):
        with pytest.raises(ConfigError, match=why):
            method_recipes(load_recipe(str(write_study(tmp_path, seeds=bad))))


def test_models_run_every_method_on_every_model(tmp_path):
    runs = method_recipes(load_recipe(str(write_study(tmp_path, models=["tiny-qwen2", "tiny-gpt2"]))))
    assert list(runs) == ["tiny-qwen2-lora", "tiny-qwen2-lora-peft", "tiny-qwen2-prefix", "tiny-gpt2-lora",
                          "tiny-gpt2-lora-peft", "tiny-gpt2-prefix"]
    assert runs["tiny-gpt2-prefix"].model == "tiny-gpt2" and runs["tiny-gpt2-prefix"].train.lr == 5e-3
    assert runs["tiny-qwen2-lora"].output == str(tmp_path / "study" / "tiny-qwen2-lora")
    alone = method_recipes(load_recipe(str(write_study(tmp_path, models=["tiny-qwen2", "tiny-gpt2"], methods={}))))
    assert list(alone) == ["tiny-qwen2", "tiny-gpt2"] and alone["tiny-gpt2"].adapter == "lora"


def test_models_study_trains_each_model_into_one_report(tmp_path):
    recipe = load_recipe(str(write_study(tmp_path, models=["tiny-llama", "tiny-gpt2"], methods={},
                                         train={"max_steps": 2, "batch_size": 4, "lr": 1.0e-2, "logging_steps": 1,
                                                "save_steps": 2, "seed": 3})))
    report = train_methods(recipe, source="study.yaml")
    markdown = (report / "report.md").read_text()
    assert "| tiny-llama | tiny-llama | lora | peftkit |" in markdown and "| tiny-gpt2 | tiny-gpt2 | lora |" in markdown
    assert "Models tiny-llama, tiny-gpt2; shared setup: data sst2 + e2e" in markdown
    config = json.loads((tmp_path / "study" / "tiny-gpt2" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"] and config["fan_in_fan_out"] is True


@pytest.mark.parametrize("extra, message", [
    ({"models": ["tiny-gpt2", "tiny-gpt2"]}, "models: lists a model twice"),
    ({"models": ["tiny-gpt2"], "methods": {"a": {"model": "tiny-qwen2"}}}, "methods.a: cannot set model"),
    ({"models": ["tiny-gpt2"], "methods": {"a": {"task": "seq2seq"}}}, "models.tiny-gpt2, methods.a: "),
])
def test_bad_models_name_the_run(tmp_path, extra, message):
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.")):
        load_recipe(str(write_study(tmp_path, **extra)))


@pytest.mark.parametrize("methods, message", [
    ({"a": {"train": {"lrr": 1}}}, "methods.a: unknown key train.lrr: did you mean train.lr?"),
    ({"a": {"adapter": "lorra"}}, "methods.a: adapter: unknown adapter preset 'lorra'"),
    ({"a": {"output": "x"}}, "methods.a: cannot set output, methods or models"),
    ({"a": "lora"}, "methods.a: expected a mapping"),
    ({"a/b": {}}, "methods: run names must be letters, digits"),
])
def test_bad_methods_name_the_method(tmp_path, methods, message):
    with pytest.raises(ConfigError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
        load_recipe(str(write_study(tmp_path, methods=methods)))


def test_trains_every_method_and_reports(tmp_path):
    recipe = load_recipe(str(write_study(tmp_path)))
    report = train_methods(recipe, source="study.yaml")
    study = tmp_path / "study"
    assert report == study / "report" and (report / "report.md").is_file() and (report / "report.html").is_file()
    summaries = {name: summarize(study / name) for name in ("lora", "lora-peft", "prefix")}
    system = json.loads((study / "lora" / "system.json").read_text())
    assert system["data"]["examples"] == 16  # 8 from each source, mixed
    # same data, seed and budget: the peftkit / peft pair trains identically
    ours, theirs = summaries["lora"].losses, summaries["lora-peft"].losses
    assert [s for s, _ in ours] == [s for s, _ in theirs] == [1, 2, 3]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs)) <= 1e-4
    assert all("sst2/accuracy" in s.metrics for s in summaries.values())
    markdown = (report / "report.md").read_text()
    assert all(f"| {name} |" in markdown for name in summaries) and "lora vs lora-peft" in markdown
    base = json.loads((study / "base" / "eval.json").read_text())  # the base model, for forgetting and samples
    assert base["adapter"] is None and len(base["tasks"]["sst2"]["scores"]["correct"]) == 4

    # an interrupted study: the last method never finished; --resume trains only that one
    stamp = (study / "lora" / "system.json").stat().st_mtime_ns
    (study / "prefix" / "system.json").unlink()
    with pytest.raises(ConfigError, match="--overwrite"):
        train_methods(recipe)
    train_methods(recipe, resume=True)
    assert (study / "lora" / "system.json").stat().st_mtime_ns == stamp
    assert (study / "prefix" / "system.json").is_file()
    with pytest.raises(ConfigError, match="recipe differs"):
        train_methods(load_recipe(str(write_study(tmp_path)), ["train.seed=4"]), resume=True)


def test_cli_refuses_nproc_with_methods(tmp_path):
    done = subprocess.run([sys.executable, "-m", "peftkit", "train", str(write_study(tmp_path)), "--nproc", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "--nproc" in done.stderr
    assert not (tmp_path / "study").exists()
