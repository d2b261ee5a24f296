"""QLoRA: LoRA over NF4 base layers, against peft + bitsandbytes on the same 4-bit weights."""

import json
import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import peftkit
from peftkit.errors import AdapterError
from peftkit.methods.lora import LoRALinear
from peftkit.nf4 import Linear4bit
from peftkit.qlora import weight_memory
from peftkit.peft_backend import bnb_quantize
from peftkit.targets import linear_module_names
from tests.conftest import randomize_adapter, token_batch

bnb = pytest.importorskip("bitsandbytes")
from peft import PeftModel  # noqa: E402


def bnb_model(name: str) -> torch.nn.Module:
    """The reference: every linear layer but the head as bitsandbytes NF4 with double quantisation."""
    return bnb_quantize(peftkit.load_model(name, dtype="fp32", device="cpu")[0])


def qlora_model(name: str = "tiny-llama", **overrides) -> torch.nn.Module:
    model, _ = peftkit.load_model(name, dtype="fp32", device="cpu", quantize="nf4")
    return peftkit.apply_adapter(model, "qlora", **{"r": 8, "alpha": 16, "dropout": 0.0, **overrides})


def test_quantized_model_equals_bitsandbytes():
    ours, _ = peftkit.load_model("tiny-llama", quantize="nf4")
    head = ours.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear) and not isinstance(head, Linear4bit)
    assert all(isinstance(ours.get_submodule(n), Linear4bit) for n in linear_module_names(ours))
    x = token_batch(ours.config.vocab_size)
    with torch.no_grad():
        assert (ours(x).logits - bnb_model("tiny-llama")(x).logits).abs().max() <= 1e-5


def test_qlora_preset_quantizes_a_full_precision_model():
    model, _ = peftkit.load_model("tiny-llama")
    peftkit.apply_adapter(model, "qlora")
    layer = model.model.layers[0].mlp.down_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, Linear4bit) and layer.r == 64
    assert peftkit.adapter_config(model).quantize == "nf4"


def test_gradients_reach_lora_never_the_4bit_weights():
    model = qlora_model()
    randomize_adapter(model)
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith("weight_packed")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = token_batch(model.config.vocab_size)
    for _ in range(2):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(b, frozen[n]) for n, b in model.named_buffers() if n in frozen)
    assert not any(b.requires_grad for b in model.buffers())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_saved_adapter_loads_in_peft_on_bitsandbytes_base(tmp_path):
    model = qlora_model()
    randomize_adapter(model)
    x = token_batch(model.config.vocab_size)
    with torch.no_grad():
        ours = model(x).logits
    directory = peftkit.save_adapter(model, tmp_path / "q")
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["peftkit"]["base_quantization"]["quant_type"] == "nf4"
    assert "nf4" in (directory / "README.md").read_text()
    theirs = PeftModel.from_pretrained(bnb_model("tiny-llama"), directory)
    with torch.no_grad():
        assert (theirs(x).logits - ours).abs().max() <= 1e-4
    # peftkit rebuilds the 4-bit base from the note when loading onto a full-precision model
    again = peftkit.load_adapter(peftkit.load_model("tiny-llama")[0], directory)
    assert isinstance(again.model.layers[1].self_attn.o_proj.base, Linear4bit)
    with torch.no_grad():
        assert (again(x).logits - ours).abs().max() <= 1e-6


def test_loss_curves_equal_peft_and_bitsandbytes(tmp_path):
    from tests.test_peft_parity import train_losses

    torch.manual_seed(0)
    model = qlora_model()
    directory = peftkit.save_adapter(model, tmp_path / "init")
    reference = PeftModel.from_pretrained(bnb_model("tiny-llama"), directory, is_trainable=True)
    assert peftkit.trainable_parameters(model)[0] == reference.get_nb_trainable_parameters()[0]
    # the total counts 4-bit weights at their logical size in both (bitsandbytes packs 2 per element)
    assert peftkit.trainable_parameters(reference) == peftkit.trainable_parameters(model)
    ours, theirs = train_losses(model), train_losses(reference)
    assert ours[-1] < ours[0] - 0.05
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-3


def test_merge_dequantizes_and_unmerge_restores_4bit():
    model = qlora_model(dora=False)
    randomize_adapter(model)
    x = token_batch(model.config.vocab_size)
    packed = model.model.layers[0].self_attn.q_proj.base.weight_packed.clone()
    with torch.no_grad():
        unmerged = model(x).logits
        peftkit.merge_adapter(model)
        assert isinstance(model.model.layers[0].self_attn.q_proj.base, torch.nn.Linear)
        assert (model(x).logits - unmerged).abs().max() <= 1e-5
        peftkit.unmerge_adapter(model)
        assert torch.equal(model.model.layers[0].self_attn.q_proj.base.weight_packed, packed)
        assert torch.equal(model(x).logits, unmerged)
        peftkit.merge_adapter(model, unload=True)
    assert not any(isinstance(m, (Linear4bit, LoRALinear)) for m in model.modules())


@pytest.mark.slow
def test_real_model_bits_and_peft_parity(smol_dir, tmp_path, capsys):
    model = qlora_model("smollm2-135m")
    memory = weight_memory(model)
    print(f"smollm2-135m NF4 + double quant: {memory['bits_per_parameter']:.4f} bits/parameter over "
          f"{memory['parameters']:,} weights in {memory['layers']} layers")
    assert 4.126 < memory["bits_per_parameter"] < 4.13  # 4 + 8/64 + 32/(64*256) = 4.127, plus offsets
    randomize_adapter(model, std=0.01)
    x = token_batch(model.config.vocab_size, length=12)
    with torch.no_grad():
        ours = model(x).logits
    theirs = PeftModel.from_pretrained(bnb_model("smollm2-135m"), peftkit.save_adapter(model, tmp_path / "q"))
    with torch.no_grad():
        assert (theirs(x).logits - ours).abs().max() <= 1e-4


def test_partial_block_layer_is_skipped_with_warning(caplog):
    config = LlamaConfig(vocab_size=64, hidden_size=36, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config)
    with caplog.at_level(logging.WARNING, logger="peftkit.qlora"):
        peftkit.apply_adapter(model, "qlora", r=4)
    assert "model.layers.0.self_attn.q_proj" in caplog.text and "not a multiple of the block size" in caplog.text
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, torch.nn.Linear)  # 36 x 36: skipped
    assert isinstance(model.model.layers[0].mlp.up_proj.base, Linear4bit)  # 64 x 36 = 36 blocks: quantised


def test_qlora_adapter_onto_another_base(tmp_path):
    model = qlora_model()
    directory = peftkit.save_adapter(model, tmp_path / "q")
    other = LlamaForCausalLM(LlamaConfig(vocab_size=259, hidden_size=128, intermediate_size=256,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(AdapterError, match=r"has shape \(8, 64\) but .* expects \(8, 128\)"):
        peftkit.load_adapter(other, directory)


def test_parameter_count_of_a_4bit_model_is_its_logical_size():
    full, _ = peftkit.load_model("tiny-llama")
    base_total = sum(p.numel() for p in full.parameters())
    model = qlora_model()
    trainable, total = peftkit.trainable_parameters(model)
    assert total == base_total + trainable  # the 4-bit weights count as out x in values, not packed bytes
