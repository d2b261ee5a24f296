"""The model registry, the offline cache of the real model, and tiny-llama."""

import subprocess
import sys
import threading
import time

import pytest
import torch

import peftkit
from peftkit import models


def test_tiny_llama_is_deterministic_gqa():
    (a, tok), (b, _) = peftkit.load_model("tiny-llama"), peftkit.load_model("tiny-llama")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    cfg = a.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 64, 4, 2)
    assert a.model.layers[0].self_attn.k_proj.out_features == 2 * 16  # key/value heads x head dim
    text = "héllo wörld"
    assert tok.decode(tok(text)["input_ids"]) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_local_directory_round_trip(tmp_path):
    model, tok = peftkit.load_model("tiny-llama")
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    again, tok2 = peftkit.load_model(str(tmp_path))
    x = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(model(x).logits, again(x).logits)
    assert again.peftkit_base_name == str(tmp_path)


def test_cache_is_built_atomically(tmp_path, monkeypatch):
    """Two concurrent loaders: both get a complete cache, and no temp directory is left."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    calls = []

    def slow_build(entry, out):
        calls.append(out)
        out.mkdir()
        time.sleep(0.2)  # a reader must never see this half-written state as the cache
        (out / "weights").write_text("w")
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models.fetch, "_build_cache", slow_build)
    entry = models.REGISTRY["smollm2-135m"]
    results = []
    threads = [threading.Thread(target=lambda: results.append(models.ensure_cached(entry))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = tmp_path / "models" / "smollm2-135m"
    assert results == [final, final] and len(calls) == 2
    assert sorted(p.name for p in final.iterdir()) == ["config.json", "weights"]
    assert [p.name for p in final.parent.iterdir()] == ["smollm2-135m"]


def test_models_command_lists_registry(tmp_path):
    done = subprocess.run([sys.executable, "-m", "peftkit", "models"], capture_output=True, text=True,
                          env={"PEFTKIT_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines()[1:] if line.strip()[:1].isalnum()}
    assert rows["smollm2-135m"] == "no" and rows["tiny-llama"] == "yes" and rows["tiny-bert"] == "yes"
    assert "[Apache-2.0]" in done.stdout


@pytest.mark.slow
def test_smollm2_config_and_answer(smol):
    model, tok = smol
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert not hasattr(cfg, "quantization_config")
    assert model.peftkit_base_name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs["input_ids"].shape[1]:])


@pytest.mark.slow
def test_smollm2_cache_equals_gguf(smol, tmp_path):
    """The cached safetensors hold exactly what transformers' GGUF loader produces."""
    from transformers import AutoModelForCausalLM

    gguf = models.fetch.assemble(models.REGISTRY["smollm2-135m"], tmp_path)
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    x = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        assert torch.equal(smol[0](x).logits, reference(x).logits)
