"""Bad input: one-line peftkit errors that name the problem and the fix; nothing on disk lost."""

import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.errors import AdapterError, ConfigError, ModelError
from tests.conftest import VOCAB, randomize_adapter, token_batch


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_unknown_preset(tiny):
    with pytest.raises(ConfigError) as exc:
        peftkit.apply_adapter(tiny[0], "lroa")
    assert "did you mean 'lora'" in one_line(exc)


def test_unknown_key_suggests_closest(tiny):
    with pytest.raises(ConfigError) as exc:
        peftkit.apply_adapter(tiny[0], "lora", rank=4)
    assert "adapter.rank" in one_line(exc) and "'r'" in one_line(exc)


@pytest.mark.parametrize("r", [0, -4, 2.5])
def test_bad_rank(tiny, r):
    with pytest.raises(ConfigError, match="r must be a positive integer"):
        peftkit.apply_adapter(tiny[0], "lora", r=r)


def test_target_matching_nothing_lists_linear_names(tiny):
    model, _ = tiny
    with pytest.raises(AdapterError) as exc:
        peftkit.apply_adapter(model, "lora", target_modules=["query"])
    assert "q_proj" in one_line(exc) and "gate_proj" in one_line(exc)
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing was frozen


def test_target_of_wrong_type(tiny):
    with pytest.raises(AdapterError, match="is a LlamaAttention"):
        peftkit.apply_adapter(tiny[0], "lora", target_modules=["self_attn"])


def test_twice_applied(tiny):
    model, _ = tiny
    peftkit.apply_adapter(model, "lora")
    with pytest.raises(AdapterError, match="already has an adapter"):
        peftkit.apply_adapter(model, "lora")


def test_adapter_for_another_model(tiny, tmp_path):
    model, _ = tiny
    peftkit.apply_adapter(model, "lora")
    peftkit.save_adapter(model, tmp_path / "a")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterError) as exc:
        peftkit.load_adapter(other, tmp_path / "a")
    message = one_line(exc)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in message
    assert "(8, 64)" in message and "(8, 32)" in message
    assert getattr(other, "peftkit_config", None) is None  # the failed load left no adapter behind
    assert all(p.requires_grad for p in other.parameters())


def test_missing_and_truncated_weights(tiny, tmp_path):
    model, _ = tiny
    peftkit.apply_adapter(model, "lora")
    directory = peftkit.save_adapter(model, tmp_path / "a")
    weights = directory / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    fresh, _ = peftkit.load_model("tiny-llama")
    with pytest.raises(AdapterError) as exc:
        peftkit.load_adapter(fresh, directory)
    assert "truncated or corrupted" in one_line(exc)
    weights.unlink()
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        peftkit.load_adapter(fresh, directory)
    (directory / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(AdapterError, match="never reads"):
        peftkit.load_adapter(fresh, directory)
    with pytest.raises(AdapterError, match="does not exist"):
        peftkit.load_adapter(fresh, tmp_path / "nowhere")


def test_corrupted_config(tiny, tmp_path):
    model, _ = tiny
    peftkit.apply_adapter(model, "lora")
    directory = peftkit.save_adapter(model, tmp_path / "a")
    (directory / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        peftkit.load_adapter(peftkit.load_model("tiny-llama")[0], directory)


def test_save_never_overwrites_without_asking(tiny, tmp_path):
    model, _ = tiny
    peftkit.apply_adapter(model, "lora")
    randomize_adapter(model, seed=1)
    directory = peftkit.save_adapter(model, tmp_path / "a")
    saved = {p.name: p.read_bytes() for p in directory.iterdir()}
    randomize_adapter(model, seed=2)
    with pytest.raises(AdapterError, match="overwrite=True"):
        peftkit.save_adapter(model, directory)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == saved
    peftkit.save_adapter(model, directory, overwrite=True)
    assert (directory / "adapter_model.safetensors").read_bytes() != saved["adapter_model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temp or backup directories left


def test_offline_hub_id():
    with pytest.raises(ModelError) as exc:
        peftkit.load_model("someone/some-model")
    assert "offline" in one_line(exc) and "smollm2-135m" in one_line(exc)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        peftkit.load_model(str(tmp_path))


def test_unknown_dtype():
    with pytest.raises(ModelError, match="unknown dtype"):
        peftkit.load_model("tiny-llama", dtype="fp8")


def test_malformed_preset_file(tiny, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("r: [8\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        peftkit.apply_adapter(tiny[0], str(path))


def test_cli_prints_one_line_without_traceback():
    done = subprocess.run([sys.executable, "-m", "peftkit", "demo", "--model", "tiny-llama", "--adapter", "nope"],
                          capture_output=True, text=True)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("peftkit: error: unknown adapter preset 'nope'")
    assert "lora-all" in lines[0]


def test_loads_with_only_safetensors_and_json(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    peftkit.apply_adapter(model, "lora")
    directory = peftkit.save_adapter(model, tmp_path / "a")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (pickle) was called"))
    peftkit.load_adapter(peftkit.load_model("tiny-llama")[0], directory)
    assert sorted(p.name for p in directory.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]
