"""peft is the reference: logits through each other's saved adapters, parameter counts, and
loss curves of 20 AdamW steps from identical initial weights."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import peftkit
from tests.conftest import VOCAB, randomize_adapter, token_batch, train_losses

VARIANTS = {
    "lora": ({"target_modules": ["q_proj", "v_proj"]}, {"target_modules": ["q_proj", "v_proj"]}),
    "rslora": ({"target_modules": ["q_proj", "v_proj"], "rslora": True},
               {"target_modules": ["q_proj", "v_proj"], "use_rslora": True}),
    "dora": ({"target_modules": "all-linear", "dora": True}, {"target_modules": "all-linear", "use_dora": True}),
}
TOL = 1e-5


def load(name):
    return peftkit.load_model(name, dtype="fp32", device="cpu")[0]


def ours_to_peft(name, variant, tmp_path):
    ours_kw, _ = VARIANTS[variant]
    model = load(name)
    peftkit.apply_adapter(model, "lora", r=4, alpha=8, dropout=0.0, **ours_kw)
    randomize_adapter(model)
    x = token_batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model(x).logits
    directory = peftkit.save_adapter(model, tmp_path / "ours")
    theirs_model = PeftModel.from_pretrained(load(name), directory)
    with torch.no_grad():
        theirs = theirs_model(x).logits
    return (ours - theirs).abs().max().item()


def peft_to_ours(name, variant, tmp_path):
    _, peft_kw = VARIANTS[variant]
    torch.manual_seed(0)
    peft_model = get_peft_model(load(name), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                       task_type="CAUSAL_LM", **peft_kw))
    x = token_batch(peft_model.config.vocab_size)
    with torch.no_grad():
        theirs = peft_model(x).logits
    peft_model.save_pretrained(tmp_path / "theirs")
    model = peftkit.load_adapter(load(name), tmp_path / "theirs")
    with torch.no_grad():
        ours = model(x).logits
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_ours_loads_in_peft_tiny(variant, tmp_path):
    assert ours_to_peft("tiny-llama", variant, tmp_path) <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_loads_in_ours_tiny(variant, tmp_path):
    assert peft_to_ours("tiny-llama", variant, tmp_path) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_ours_loads_in_peft_smollm2(smol_dir, variant, tmp_path):
    assert ours_to_peft("smollm2-135m", variant, tmp_path) <= TOL


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_loads_in_ours_smollm2(smol_dir, variant, tmp_path):
    assert peft_to_ours("smollm2-135m", variant, tmp_path) <= TOL


@pytest.mark.parametrize("preset,peft_kw", [
    ("lora", {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    ("lora-all", {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}),
    ("dora", {"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "use_dora": True}),
])
def test_trainable_counts_equal_peft(preset, peft_kw):
    model = peftkit.apply_adapter(load("tiny-llama"), preset)
    peft_model = get_peft_model(load("tiny-llama"), LoraConfig(task_type="CAUSAL_LM", **peft_kw))
    assert peftkit.trainable_parameters(model) == peft_model.get_nb_trainable_parameters()


def test_saved_config_matches_peft_schema(tmp_path):
    model = peftkit.apply_adapter(load("tiny-llama"), "lora-all", rslora=True)
    directory = peftkit.save_adapter(model, tmp_path / "a")
    config = LoraConfig.from_pretrained(directory)
    assert (config.r, config.lora_alpha, config.use_rslora, config.use_dora) == (16, 32, True, False)
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert config.base_model_name_or_path == "tiny-llama"


def loss_curves(name, variant, tmp_path):
    ours_kw, _ = VARIANTS[variant]
    torch.manual_seed(0)
    model = peftkit.apply_adapter(load(name), "lora", r=4, alpha=8, dropout=0.0, **ours_kw)
    directory = peftkit.save_adapter(model, tmp_path / "init")  # the identical starting point
    peft_model = PeftModel.from_pretrained(load(name), directory, is_trainable=True)
    assert peftkit.trainable_parameters(model) == peft_model.get_nb_trainable_parameters()
    return train_losses(model), train_losses(peft_model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_curves_equal_peft_tiny(variant, tmp_path):
    ours, theirs = loss_curves("tiny-llama", variant, tmp_path)
    assert ours[-1] < ours[0] - 0.05  # it learns
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_loss_curves_equal_peft_smollm2(smol_dir, variant, tmp_path):
    ours, theirs = loss_curves("smollm2-135m", variant, tmp_path)
    assert ours[-1] < ours[0]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-4
