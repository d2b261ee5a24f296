"""LoRA and DoRA invariants on tiny-llama: identity at init, frozen base, merge algebra."""

import math

import pytest
import torch
from torch import nn

import peftkit
from peftkit import LoRALinear
from peftkit.protocol import adapter_parameters
from tests.conftest import VOCAB, randomize_adapter, token_batch

VARIANTS = {"lora": {}, "rslora": {"rslora": True}, "dora": {"dora": True}}


def test_fresh_adapter_is_identity(tiny):
    model, _ = tiny
    x = token_batch(VOCAB)
    before = model(x).logits
    peftkit.apply_adapter(model, "lora-all")
    assert torch.equal(model(x).logits, before)


def test_only_adapter_parameters_train(tiny):
    model, _ = tiny
    peftkit.apply_adapter(model, "lora")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)


def test_base_weight_untouched_by_training(tiny):
    model, _ = tiny
    peftkit.apply_adapter(model, "dora", dropout=0.1)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x = token_batch(VOCAB)
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_equals_unmerged_and_unmerge_restores(tiny, variant):
    model, _ = tiny
    peftkit.apply_adapter(model, "lora-all", dropout=0.0, **VARIANTS[variant])
    randomize_adapter(model)
    base = {n: p.clone() for n, p in model.named_parameters() if n.endswith("base.weight")}
    x = token_batch(VOCAB)
    with torch.no_grad():
        unmerged = model(x).logits
        peftkit.merge_adapter(model)
        merged = model(x).logits
        assert (merged - unmerged).abs().max() <= 1e-5
        with pytest.raises(peftkit.AdapterError, match="already merged"):
            peftkit.merge_adapter(model)
        peftkit.unmerge_adapter(model)
        assert max((p - base[n]).abs().max() for n, p in model.named_parameters() if n in base) <= 1e-6
        assert (model(x).logits - unmerged).abs().max() <= 1e-5
    with pytest.raises(peftkit.AdapterError, match="not merged"):
        peftkit.unmerge_adapter(model)


def test_merge_is_w_plus_scaled_ba():
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=True)
    weight = base.weight.detach().clone()
    layer = LoRALinear(base, r=4, alpha=8, rslora=True)
    nn.init.normal_(layer.lora_B.weight)
    expected = weight + (layer.lora_B.weight @ layer.lora_A.weight) * (8 / math.sqrt(4))
    x = torch.randn(3, 5, 12)
    unmerged = layer(x)
    layer.merge()
    assert torch.allclose(base.weight, expected, atol=1e-6)
    assert torch.allclose(layer(x), unmerged, atol=1e-5)


def test_dora_merge_is_magnitude_times_direction():
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=False)
    layer = LoRALinear(base, r=4, alpha=4, dora=True)
    nn.init.normal_(layer.lora_B.weight, std=0.1)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.5)
    adapted = base.weight + layer.lora_B.weight @ layer.lora_A.weight
    expected = layer.lora_magnitude_vector.view(-1, 1) * adapted / adapted.norm(dim=1, keepdim=True)
    x = torch.randn(4, 12)
    assert torch.allclose(layer(x), x @ expected.T, atol=1e-5)
    layer.merge()
    assert torch.allclose(base.weight, expected, atol=1e-6)


def test_merge_and_unload_gives_plain_model(tiny):
    model, _ = tiny
    peftkit.apply_adapter(model, "dora", dropout=0.0)
    randomize_adapter(model)
    x = token_batch(VOCAB)
    with torch.no_grad():
        adapted = model(x).logits
        peftkit.merge_adapter(model, unload=True)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert (model(x).logits - adapted).abs().max() <= 1e-5


def test_target_modules_forms(tiny):
    model, _ = tiny
    peftkit.apply_adapter(model, {"target_modules": r"model\.layers\.0\.mlp\.(up|down)_proj", "r": 2})
    adapted = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert adapted == ["model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]


def test_all_linear_skips_output_head(tiny):
    model, _ = tiny
    peftkit.apply_adapter(model, "lora-all")
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(adapted) == 2 * 7 and "lm_head" not in adapted


def test_gaussian_init_and_scale():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 256), r=8, alpha=16, init="gaussian")
    assert layer.scale == 2.0
    assert abs(layer.lora_A.weight.std().item() - 1 / 8) < 0.01
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_trainable_parameters_counts(tiny):
    model, _ = tiny
    total_before = sum(p.numel() for p in model.parameters())
    peftkit.apply_adapter(model, "lora", r=4)
    trainable, total = peftkit.trainable_parameters(model)
    # q_proj 64->64 and v_proj 64->32 in 2 layers: r * (in + out) each
    assert trainable == 2 * 4 * ((64 + 64) + (64 + 32))
    assert total == total_before + trainable
    assert sum(p.numel() for p in adapter_parameters(model).values()) == trainable


def test_bf16_base_keeps_fp32_adapter(tiny):
    model, _ = tiny
    model.to(torch.bfloat16)
    peftkit.apply_adapter(model, "lora")
    randomize_adapter(model)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32
    out = model(token_batch(VOCAB)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _saved_bytes(model, x) -> int:
    """Bytes autograd keeps for backward through one forward (each storage counted once), with
    input embeddings that need a gradient, so every layer's input is part of the graph."""
    storages = {}
    embeds = model.get_input_embeddings()(x).detach().requires_grad_()

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=embeds, labels=x).loss
    return sum(storages.values())


def test_dropout_matches_peft_and_keeps_less_for_backward(tmp_path):
    """With dropout, the same seed drops the same elements as peft's nn.Dropout: equal loss and
    adapter gradients; and backward keeps a boolean mask instead of F.dropout's float noise and output."""
    from peft import PeftModel

    base = lambda: peftkit.load_model("tiny-llama", dtype="fp32", device="cpu")[0]  # noqa: E731
    model = peftkit.apply_adapter(base(), "lora", r=4, alpha=8, dropout=0.3, target_modules="all-linear")
    randomize_adapter(model)
    theirs = PeftModel.from_pretrained(base(), peftkit.save_adapter(model, tmp_path / "a"), is_trainable=True)
    x = token_batch(VOCAB, batch=2, length=24)
    grads = []
    for m in (model, theirs):
        m.train()
        torch.manual_seed(7)
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        grads.append((loss.item(), {n.split("base_model.model.")[-1].replace(".default", ""): p.grad
                                    for n, p in m.named_parameters() if p.requires_grad}))
    (ours_loss, ours_grads), (peft_loss, peft_grads) = grads
    assert abs(ours_loss - peft_loss) <= 1e-6 * abs(peft_loss)
    assert ours_grads.keys() == peft_grads.keys()
    for name, grad in ours_grads.items():
        assert (grad - peft_grads[name]).norm() <= 1e-5 * peft_grads[name].norm(), name
    torch.manual_seed(7)
    ours_saved = _saved_bytes(model, x)
    torch.manual_seed(7)
    peft_saved = _saved_bytes(theirs, x)
    # Per adapted layer F.dropout keeps 8 bytes an input element (noise + output); ours 1 (the
    # mask) plus 4 for the input itself, shared by the layers that read it (q, k, v; gate, up).
    inputs = sum(m.base.in_features for m in model.modules() if isinstance(m, LoRALinear)) * x.numel()
    assert peft_saved - ours_saved >= 4 * inputs
