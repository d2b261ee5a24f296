"""Every method on every model family, equal to peft: decoders (Llama, GPT-2's Conv1D, Qwen2,
Gemma 3), a BERT encoder with classification heads (seq-cls, token-cls) and T5 (seq2seq).

For each tiny model: logits through each other's saved adapters (ours -> peft, peft -> ours),
trainable counts, merge, and 20 AdamW steps with equal loss curves.
"""

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import peftkit
from peftkit.errors import AdapterError, ModelError
from peftkit.models.tasks import PEFT_TASK_TYPES
from tests.conftest import VOCAB, randomize_adapter, token_batch

TOL = 1e-5
# (registry name, task, explicit targets): each family with its own layer names
FAMILIES = {
    "gpt2": ("tiny-gpt2", "causal-lm", ["c_attn", "c_proj"]),
    "qwen2": ("tiny-qwen2", "causal-lm", ["q_proj", "v_proj"]),
    "gemma3": ("tiny-gemma3", "causal-lm", ["q_proj", "v_proj"]),
    "bert-seq-cls": ("tiny-bert", "seq-cls", ["query", "value"]),
    "bert-token-cls": ("tiny-bert", "token-cls", ["query", "value"]),
    "qwen2-seq-cls": ("tiny-qwen2", "seq-cls", ["q_proj", "v_proj"]),
    "t5": ("tiny-t5", "seq2seq", ["q", "v"]),
}
VARIANTS = {"lora": ({}, {}), "rslora": ({"rslora": True}, {"use_rslora": True}),
            "dora": ({"dora": True}, {"use_dora": True})}


def load(family: str) -> torch.nn.Module:
    name, task, _ = FAMILIES[family]
    return peftkit.load_model(name, task=task, dtype="fp32", device="cpu")[0]


def inputs(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    x = token_batch(VOCAB, batch=2, length=12, seed=seed)
    return {"input_ids": x, "decoder_input_ids": x[:, :7]} if FAMILIES[family][1] == "seq2seq" else {"input_ids": x}


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def peft_lora(family: str, targets, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_peft_model(load(family), LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                                                   task_type=PEFT_TASK_TYPES[FAMILIES[family][1]], **kw))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_both_ways_equal_peft(family, variant, tmp_path):
    ours_kw, peft_kw = VARIANTS[variant]
    # DoRA on every linear layer; peft 0.21's all-linear takes a token classifier's head too, then fails
    targets = FAMILIES[family][2] if variant != "dora" or family == "bert-token-cls" else "all-linear"
    batch = inputs(family)
    model = peftkit.apply_adapter(load(family), "lora", r=4, alpha=8, target_modules=targets, **ours_kw)
    randomize_adapter(model)
    ours = logits(model, batch)
    theirs_model = PeftModel.from_pretrained(load(family), peftkit.save_adapter(model, tmp_path / "ours"))
    assert (ours - logits(theirs_model, batch)).abs().max() <= TOL

    reference = peft_lora(family, targets, **peft_kw)
    expected = logits(reference, batch)
    reference.save_pretrained(tmp_path / "theirs")
    loaded = peftkit.load_adapter(load(family), tmp_path / "theirs")
    assert (logits(loaded, batch) - expected).abs().max() <= TOL
    assert peftkit.trainable_parameters(loaded) == reference.get_nb_trainable_parameters()
    peftkit.merge_adapter(loaded)
    assert (logits(loaded, batch) - expected).abs().max() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_never_targets_heads_and_counts_equal_peft(family):
    model = peftkit.apply_adapter(load(family), "lora-all")
    names = {name for name, m in model.named_modules() if isinstance(m, peftkit.LoRALinear)}
    assert names and not any(n.split(".")[0] in ("lm_head", "classifier", "score") for n in names)
    if family != "bert-token-cls":  # peft 0.21 puts LoRA on a token classifier's head, then refuses to train it
        reference = get_peft_model(load(family), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                                            task_type=PEFT_TASK_TYPES[FAMILIES[family][1]]))
        assert peftkit.trainable_parameters(model) == reference.get_nb_trainable_parameters()


def test_gpt2_conv1d_layers_wrapped_with_fan_in_fan_out(tmp_path):
    model = peftkit.apply_adapter(load("gpt2"), "lora", target_modules=["c_attn"], r=4)
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base, Conv1D) and layer.fan_in_fan_out
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (3 * 64, 4)
    randomize_adapter(model)
    before = layer.base.weight.clone()  # (in, out)
    peftkit.merge_adapter(model)
    assert torch.allclose(layer.base.weight - before, layer.delta_weight().T, atol=1e-7)  # W + (B A)^T
    peftkit.unmerge_adapter(model)
    assert (layer.base.weight - before).abs().max() <= 1e-6
    import json

    config = json.loads((peftkit.save_adapter(model, tmp_path / "a") / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True


@pytest.mark.parametrize("family", ["bert-seq-cls", "bert-token-cls", "qwen2-seq-cls"])
def test_classification_head_trained_and_saved_as_modules_to_save(family, tmp_path):
    model = peftkit.apply_adapter(load(family), "lora", target_modules=FAMILIES[family][2])
    head = model.classifier if hasattr(model, "classifier") else model.score
    assert all(p.requires_grad for p in head.parameters())
    with torch.no_grad():
        head.weight.add_(1.0)  # a trained head, not the fresh one
    directory = peftkit.save_adapter(model, tmp_path / "a")
    keys = load_file(directory / "adapter_model.safetensors").keys()
    head_name = "classifier" if hasattr(model, "classifier") else "score"
    assert f"base_model.model.{head_name}.weight" in keys
    reference = PeftModel.from_pretrained(load(family), directory)
    assert (logits(reference, inputs(family)) - logits(model, inputs(family))).abs().max() <= TOL
    reloaded = peftkit.load_adapter(load(family), directory)
    assert torch.equal((reloaded.classifier if head_name == "classifier" else reloaded.score).weight, head.weight)


@pytest.mark.parametrize("family", ["gpt2", "bert-seq-cls", "t5", "gemma3"])
def test_loss_curves_equal_peft(family, tmp_path):
    model = peftkit.apply_adapter(load(family), "lora", r=4, alpha=8, dropout=0.0, target_modules=FAMILIES[family][2])
    directory = peftkit.save_adapter(model, tmp_path / "init")
    reference = PeftModel.from_pretrained(load(family), directory, is_trainable=True)
    ours, theirs = train_losses(model, family), train_losses(reference, family)
    assert ours[-1] < ours[0] - 0.01
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-4


def train_losses(model: torch.nn.Module, family: str, steps: int = 20) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    task = FAMILIES[family][1]
    torch.manual_seed(0)  # the base models' own dropout draws the same masks on both sides
    model.train()
    losses = []
    for step in range(steps):
        batch = inputs(family, seed=step % 4)
        if task == "seq-cls":
            batch["labels"] = torch.tensor([0, 1])
        elif task == "token-cls":
            batch["labels"] = batch["input_ids"] % 2
        else:
            batch["labels"] = batch.pop("decoder_input_ids", batch["input_ids"]).contiguous()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma3"])
@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_on_decoders_equal_peft(family, method, tmp_path):
    model = peftkit.apply_adapter(load(family), method, num_virtual_tokens=6, init="random")
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    batch = inputs(family)
    theirs = PeftModel.from_pretrained(load(family), peftkit.save_adapter(model, tmp_path / "a"))
    assert (logits(model, batch) - logits(theirs, batch)[:, -12:]).abs().max() <= TOL
    config_class = PrefixTuningConfig if method == "prefix" else PromptTuningConfig
    torch.manual_seed(0)
    reference = get_peft_model(load(family), config_class(task_type="CAUSAL_LM", num_virtual_tokens=6))
    reference.save_pretrained(tmp_path / "theirs")
    loaded = peftkit.load_adapter(load(family), tmp_path / "theirs")
    assert (logits(loaded, batch) - logits(reference, batch)[:, -12:]).abs().max() <= TOL
    assert peftkit.trainable_parameters(loaded) == reference.get_nb_trainable_parameters()


def test_qlora_quantises_gpt2_conv1d_layers():
    model = peftkit.apply_adapter(load("gpt2"), "qlora")
    layer = model.transformer.h[0].mlp.c_fc
    assert isinstance(layer.base, peftkit.Linear4bit) and layer.base.weight_shape == (256, 64)  # (out, in)
    original = load("gpt2").transformer.h[0].mlp.c_fc  # Conv1D, weight (in, out)
    dequantized = layer.base.dequantized_weight()
    assert (dequantized - original.weight.T).abs().max() <= 0.15 * original.weight.abs().max()  # NF4's widest gap / 2
    x = torch.randn(3, 64)
    expected = torch.nn.functional.linear(x, dequantized, original.bias)  # x @ W + b with the 4-bit W
    assert torch.allclose(layer.base(x), expected, atol=1e-6)


def test_task_errors_are_one_line():
    with pytest.raises(ModelError, match="cannot do task 'seq2seq'.*causal-lm"):
        peftkit.load_model("tiny-llama", task="seq2seq")
    with pytest.raises(ModelError, match="unknown task 'classify'"):
        peftkit.load_model("tiny-bert", task="classify")
    with pytest.raises(ModelError, match="num_labels=3 is for seq-cls and token-cls"):
        peftkit.load_model("tiny-llama", num_labels=3)
    model = peftkit.load_model("tiny-bert", task="seq-cls", num_labels=5)[0]
    assert model.classifier.out_features == 5


def test_head_adapter_refused_on_a_model_without_head(tmp_path):
    model = peftkit.apply_adapter(load("bert-seq-cls"), "lora", target_modules=["query"])
    directory = peftkit.save_adapter(model, tmp_path / "a")
    plain = peftkit.load_model("tiny-qwen2")[0]
    with pytest.raises(AdapterError, match="trained classification head"):
        peftkit.load_adapter(plain, directory)


def test_unsupported_target_layer_names_its_type():
    with pytest.raises(AdapterError, match="is a Embedding, which this adapter cannot wrap"):
        peftkit.apply_adapter(load("gpt2"), "lora", target_modules=["wte"])


@pytest.mark.parametrize("family", ["gpt2", "qwen2", "gemma3", "bert-seq-cls", "bert-token-cls", "t5"])
def test_merge_writes_a_plain_model_of_each_family(family, tmp_path):
    from transformers import AutoConfig

    from peftkit.merge import merge_to_dir
    from peftkit.models.tasks import AUTO_CLASSES

    name, task, targets = FAMILIES[family]
    model = peftkit.load_model(name, task=task, num_labels=3 if task.endswith("cls") else None)[0]
    peftkit.apply_adapter(model, "lora", target_modules=targets, dropout=0.0)
    randomize_adapter(model)
    record = merge_to_dir(peftkit.save_adapter(model, tmp_path / "adapter"), tmp_path / "merged")
    assert record["task"] == task and record["max_logit_diff_fp32"] <= TOL
    config = AutoConfig.from_pretrained(tmp_path / "merged")
    plain = AUTO_CLASSES[task].from_pretrained(tmp_path / "merged", config=config).eval()
    batch = inputs(family)
    assert (logits(plain, batch) - logits(model, batch)).abs().max() <= TOL

