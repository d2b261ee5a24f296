"""`peftkit merge A B --combine ...` and the `combine` recipe key: combined adapters equal peft's
add_weighted_adapter on the same sources, measure their sources' tasks before and after, and
land in the comparison report as combination rows."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import VOCAB, token_batch

import peftkit
from peftkit.errors import ConfigError
from peftkit.recipe import load_recipe
from peftkit.study import train_methods


def write_study(tmp_path: Path, **extra) -> Path:
    recipe = {
        "model": "tiny-llama", "adapter": "lora",
        "data": {"max_length": 512, "limit": 8},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 3.0e-2, "logging_steps": 1, "save_steps": 3, "seed": 3},
        "eval": {"tasks": ["sst2"], "limit": 4},
        "output": str(tmp_path / "study"),
        "methods": {"lora-sst2": {"data": {"train": "sst2", "format": "sst2"}},
                    "lora-e2e": {"data": {"train": "e2e", "format": "e2e"}}},
        "combine": {"linear": {"weights": [0.5, 0.5]}, "ties": {"combination": "ties", "density": 0.5,
                                                                 "weights": [1.0, 1.0]}},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftkit", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("merge")
    train_methods(load_recipe(str(write_study(tmp_path))))
    return tmp_path / "study"


def peft_combination(study: Path, combination: str, weights: list[float], **options):
    from peft import PeftModel

    model = PeftModel.from_pretrained(peftkit.load_model("tiny-llama")[0], study / "lora-sst2" / "adapter",
                                      adapter_name="s")
    model.load_adapter(study / "lora-e2e" / "adapter", adapter_name="e")
    model.add_weighted_adapter(["s", "e"], weights, "m", combination_type=combination, **options)
    model.set_adapter("m")
    return model.eval()


def test_recipe_combinations_equal_peft_and_measure_their_sources(study):
    x = token_batch(VOCAB)
    for name, combination, weights, options in (("linear", "linear", [0.5, 0.5], {}),
                                                ("ties", "ties", [1.0, 1.0], {"density": 0.5})):
        record = json.loads((study / name / "adapter" / "merge.json").read_text())
        assert record["combination"] == combination and record["weights"] == weights
        assert [s["name"] for s in record["sources"]] == ["lora-sst2", "lora-e2e"]
        source_eval = json.loads((study / "lora-sst2" / "eval.json").read_text())
        assert record["metrics"]["lora-sst2"]["before"]["sst2/accuracy"] == source_eval["tasks"]["sst2"]["metrics"]["accuracy"]
        combined_eval = json.loads((study / name / "eval.json").read_text())
        assert record["metrics"]["lora-sst2"]["after"]["sst2/accuracy"] == combined_eval["tasks"]["sst2"]["metrics"]["accuracy"]
        ours = peftkit.load_adapter(peftkit.load_model("tiny-llama")[0].eval(), study / name / "adapter")
        with torch.no_grad():
            assert (ours(x).logits - peft_combination(study, combination, weights, **options)(x).logits).abs().max() <= 1e-5
    report = (study / "report" / "report.md").read_text()
    assert "| ties | combination |" in report and "ties of lora-sst2 + lora-e2e" in report
    assert "| lora-sst2 | peftkit |" in report
    system = json.loads((study / "ties" / "system.json").read_text())
    assert system["trainable_parameters"] == json.loads((study / "lora-sst2" / "system.json").read_text())["trainable_parameters"]


def test_cli_combines_into_an_adapter_or_a_full_model(study, tmp_path):
    from transformers import AutoModelForCausalLM

    sources = [str(study / "lora-sst2"), str(study / "lora-e2e")]
    out = tmp_path / "dare"
    done = cli("merge", *sources, "--combine", "dare_linear", "--weights", "0.6,0.4", "--density", "0.5", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "combined 2 adapters with dare_linear" in done.stdout and "lora-sst2: sst2/accuracy" in done.stdout
    card = (out / "README.md").read_text()
    assert "dare_linear" in card and "0.6, 0.4" in card and sources[0] in card
    assert json.loads((out / "merge.json").read_text())["density"] == 0.5
    again = cli("merge", *sources, "--combine", "dare_linear", "--density", "0.5", "--out", str(out))
    assert again.returncode != 0 and "already exists: pass --overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    full = tmp_path / "full"
    done = cli("merge", *sources, "--combine", "linear", "--full", "--no-eval", "--out", str(full))
    assert done.returncode == 0, done.stderr
    x = token_batch(VOCAB)
    plain = AutoModelForCausalLM.from_pretrained(full).eval()
    with torch.no_grad():
        expected = peft_combination(study, "linear", [0.5, 0.5])(x).logits
        assert (plain(x).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("args, message", [
    (["--weights", "0.5"], "--weights has 1 values for 2 adapters"),
    (["--weights", "a,b"], "--weights must be numbers"),
    (["--combine", "ties"], "needs density"),
])
def test_cli_bad_input_is_one_line(study, tmp_path, args, message):
    done = cli("merge", str(study / "lora-sst2"), str(study / "lora-e2e"), *args, "--no-eval", "--out", str(tmp_path / "o"))
    assert done.returncode != 0 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_cli_refuses_adapters_of_different_base_models(study, tmp_path):
    other = peftkit.apply_adapter(peftkit.load_model("tiny-qwen2")[0], "lora")
    peftkit.save_adapter(other, tmp_path / "qwen")
    done = cli("merge", str(study / "lora-sst2"), str(tmp_path / "qwen"), "--out", str(tmp_path / "o"))
    assert done.returncode != 0 and "different base models" in done.stderr


def test_combine_key_is_checked_before_training(tmp_path):
    for combine, message in (({"x": {"sources": ["nope"]}}, "combine.x.sources"),
                             ({"x": {"combination": "mean"}}, "combine.x.combination"),
                             ({"x": {"weights": [1.0]}}, "combine.x.weights"),
                             ({"lora-e2e": {}}, "names a trained run"),
                             ({"x": {"density": 2}}, "combine.x.density")):
        with pytest.raises(ConfigError, match=message):
            load_recipe(str(write_study(tmp_path, combine=combine))).check()
