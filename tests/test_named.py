"""Named adapters on one base, and mixed-adapter batches, against running each adapter alone and against peft."""

import pytest
import torch
from conftest import VOCAB, randomize_adapter, token_batch

import peftkit
from peftkit.errors import AdapterError
from peftkit.methods.lora import LoRALinear
from peftkit.protocol import adapter_parameters, adapter_state_dict, load_adapter_state_dict
from peftkit.slots import AdapterSlots, view

B_SPEC = {"r": 4, "alpha": 16, "target_modules": ["q_proj", "k_proj", "down_proj"]}


def base_model():
    return peftkit.load_model("tiny-llama")[0].eval()


def two_adapters(second: str = "lora", **second_overrides):
    """tiny-llama with `default` (LoRA r8 q,v) and `b` (another config), both with random tensors."""
    model = base_model()
    peftkit.apply_adapter(model, "lora")
    randomize_adapter(model, seed=0)
    peftkit.apply_adapter(model, second, name="b", **(second_overrides or (B_SPEC if second == "lora" else {})))
    with view(model, "b"):
        randomize_adapter(model, seed=1)
    return model


def alone(model, name):
    """A fresh base with only adapter `name`, holding the same tensors."""
    fresh = base_model()
    peftkit.apply_adapter(fresh, peftkit.adapter_config(model, name))
    load_adapter_state_dict(fresh, adapter_state_dict(model, name))
    return fresh


def test_named_adapters_list_switch_and_equal_each_alone():
    model = two_adapters()
    x = token_batch(VOCAB)
    infos = peftkit.adapters(model)
    assert list(infos) == ["default", "b"] and infos["default"].active and not infos["b"].active
    assert infos["default"].parameters == sum(p.numel() for p in adapter_parameters(alone(model, "default")).values())
    assert all(isinstance(m, AdapterSlots) for name, m in model.named_modules() if name.endswith(("q_proj", "k_proj")))
    with torch.no_grad():
        assert torch.equal(model(x).logits, alone(model, "default")(x).logits)
        peftkit.set_adapter(model, "b")
        assert torch.equal(model(x).logits, alone(model, "b")(x).logits)
        assert not torch.equal(model(x).logits, alone(model, "default")(x).logits)
        with peftkit.disable_adapter(model):
            assert torch.equal(model(x).logits, base_model()(x).logits)
        assert torch.equal(model(x).logits, alone(model, "b")(x).logits)


def test_one_adapter_keeps_its_layout_and_disables():
    model = base_model()
    peftkit.apply_adapter(model, "lora")
    randomize_adapter(model)
    q_proj = model.model.layers[0].self_attn.q_proj
    x = token_batch(VOCAB)
    with torch.no_grad():
        adapted = model(x).logits
        with peftkit.disable_adapter(model):
            assert torch.equal(model(x).logits, base_model()(x).logits)
        mixed = model(x, adapter_names=["default", "__base__"]).logits
    assert model.model.layers[0].self_attn.q_proj is q_proj and isinstance(q_proj, LoRALinear)  # no containers left
    assert torch.equal(model(x).logits, adapted) and torch.equal(mixed[0], adapted[0])
    assert list(peftkit.adapters(model)) == ["default"]


def test_only_the_active_adapter_trains():
    model = two_adapters().train()
    peftkit.set_adapter(model, "b")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model, "b").values()}
    before = {k: t.clone() for k, t in adapter_state_dict(model, "default").items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = token_batch(VOCAB)
    model(batch, labels=batch).loss.backward()
    opt.step()
    after = adapter_state_dict(model, "default")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_delete_back_to_one_and_to_the_bare_base():
    model = two_adapters()
    x = token_batch(VOCAB)
    b_alone = alone(model, "b")
    peftkit.delete_adapter(model, "default")
    assert list(peftkit.adapters(model)) == ["b"] and peftkit.adapters(model)["b"].active
    assert not any(isinstance(m, AdapterSlots) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x).logits, b_alone(x).logits)
        peftkit.delete_adapter(model, "b")
        assert model.peftkit_config is None and not any(isinstance(m, LoRALinear) for m in model.modules())
        assert torch.equal(model(x).logits, base_model()(x).logits)


def test_mixed_methods_share_a_base():
    model = two_adapters("ia3")
    x = token_batch(VOCAB)
    assert peftkit.adapters(model)["b"].method == "ia3"
    with torch.no_grad():
        mixed = model(x, adapter_names=["b", "default"]).logits
        assert torch.allclose(mixed[0], alone(model, "b")(x[:1]).logits[0], atol=1e-5)
        assert torch.allclose(mixed[1], alone(model, "default")(x[1:]).logits[0], atol=1e-5)


@pytest.mark.parametrize("row_names", [["default", "b", "__base__", "b"], ["b", "b", "b", "b"]])
def test_mixed_batch_rows_equal_each_row_alone_and_peft(tmp_path, row_names):
    from peft import PeftModel

    model = two_adapters()
    x = token_batch(VOCAB, batch=4)
    with torch.no_grad():
        mixed = model(x, adapter_names=row_names).logits
        for row, name in enumerate(row_names):
            single = base_model() if name == "__base__" else alone(model, name)
            assert (mixed[row] - single(x[row:row + 1]).logits[0]).abs().max() <= 1e-5
        peftkit.save_adapter(model, tmp_path / "both")
        peft_model = PeftModel.from_pretrained(base_model(), tmp_path / "both")
        peft_model.load_adapter(tmp_path / "both" / "b", adapter_name="b")
        assert (peft_model(x, adapter_names=row_names).logits - mixed).abs().max() <= 1e-5


def test_mixed_batch_generation_equals_each_row_and_peft(tmp_path):
    from peft import PeftModel

    model = two_adapters()
    prompt = token_batch(VOCAB, batch=3, length=6)
    row_names = ["b", "__base__", "default"]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "attention_mask": torch.ones_like(prompt), "pad_token_id": 0}
    out = model.generate(prompt, adapter_names=row_names, **kwargs)
    for row, name in enumerate(row_names):
        single = base_model() if name == "__base__" else alone(model, name)
        one = {**kwargs, "attention_mask": kwargs["attention_mask"][row:row + 1]}
        assert torch.equal(out[row], single.generate(prompt[row:row + 1], **one)[0])
    beams = model.generate(prompt, adapter_names=row_names, num_beams=2, **kwargs)
    assert beams.shape == out.shape
    peftkit.save_adapter(model, tmp_path / "both")
    peft_model = PeftModel.from_pretrained(base_model(), tmp_path / "both")
    peft_model.load_adapter(tmp_path / "both" / "b", adapter_name="b")
    assert torch.equal(peft_model.generate(input_ids=prompt, adapter_names=row_names, **kwargs), out)


def test_multi_adapter_directories_both_ways(tmp_path):
    from peft import PeftModel

    model = two_adapters()
    x = token_batch(VOCAB)
    peftkit.save_adapter(model, tmp_path / "ours")
    assert (tmp_path / "ours" / "adapter_config.json").is_file() and (tmp_path / "ours" / "b" / "adapter_config.json").is_file()
    peft_model = PeftModel.from_pretrained(base_model(), tmp_path / "ours")
    peft_model.load_adapter(tmp_path / "ours" / "b", adapter_name="b")
    peft_model.save_pretrained(tmp_path / "peft")
    loaded = peftkit.load_adapter(base_model(), tmp_path / "peft")
    assert list(peftkit.adapters(loaded)) == ["default", "b"]
    with torch.no_grad():
        for name in ("default", "b"):
            peft_model.set_adapter(name)
            peftkit.set_adapter(model, name)
            peftkit.set_adapter(loaded, name)
            ours = model(x).logits
            assert (peft_model(x).logits - ours).abs().max() <= 1e-5
            assert torch.equal(loaded(x).logits, ours)
    only_b = peftkit.load_adapter(base_model(), tmp_path / "peft", name="b")
    assert list(peftkit.adapters(only_b)) == ["b"]
    peftkit.save_adapter(model, tmp_path / "b_alone", name="b")  # one adapter: at the top, as peft loads it
    single = PeftModel.from_pretrained(base_model(), tmp_path / "b_alone")
    with torch.no_grad():
        assert (single(x).logits - alone(model, "b")(x).logits).abs().max() <= 1e-5


def test_merge_the_active_of_several():
    model = two_adapters()
    x = token_batch(VOCAB)
    peftkit.set_adapter(model, "b")
    with torch.no_grad():
        expected = alone(model, "b")(x).logits
        merged = peftkit.merge_adapter(model, unload=True)
        assert model.peftkit_config is None and not any(isinstance(m, (AdapterSlots, LoRALinear)) for m in model.modules())
        assert (merged(x).logits - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("action, message", [
    (lambda m: peftkit.apply_adapter(m, "lora"), "pass name="),
    (lambda m: peftkit.apply_adapter(m, "lora", name="b"), "already has an adapter named 'b'"),
    (lambda m: peftkit.apply_adapter(m, "lora", name="a.b"), "without '.'"),
    (lambda m: peftkit.apply_adapter(m, "prefix", name="p"), "changes the model's inputs"),
    (lambda m: peftkit.apply_adapter(m, "qlora", name="q"), "different precisions"),
    (lambda m: peftkit.apply_adapter(m, "lora", name="p", init="pissa"), "changes the base weights"),
    (lambda m: peftkit.set_adapter(m, "c"), "no adapter named 'c'; its adapters: default, b"),
    (lambda m: peftkit.delete_adapter(m, "c"), "no adapter named 'c'"),
    (lambda m: m(token_batch(VOCAB), adapter_names=["default", "c"]), "'c', which is not on this model"),
    (lambda m: m(token_batch(VOCAB, batch=3), adapter_names=["default", "b"]), "2 names for a batch of 3 rows"),
    (lambda m: m(token_batch(VOCAB), adapter_names="default"), "one adapter name per row"),
    (lambda m: m.train()(token_batch(VOCAB), adapter_names=["b", "b"]), "is for inference"),
])
def test_bad_input_is_one_line(action, message):
    model = two_adapters()
    with pytest.raises(AdapterError, match=".*".join(map(__import__("re").escape, message.split("*")))) as info:
        action(model)
    assert "\n" not in str(info.value)
    assert list(peftkit.adapters(model)) == ["default", "b"]  # nothing half-added


def test_replacing_a_named_adapter_needs_overwrite():
    model = two_adapters()
    peftkit.apply_adapter(model, "lora", name="b", overwrite=True, r=2)
    assert peftkit.adapter_config(model, "b").r == 2 and list(peftkit.adapters(model)) == ["default", "b"]


def test_swap_adapter_in_place_equals_a_fresh_load(tmp_path):
    model = two_adapters()
    x = token_batch(VOCAB)
    other = base_model()
    peftkit.apply_adapter(other, "lora", r=4, alpha=8)  # a lower rank than default's 8, same targets
    randomize_adapter(other, seed=5)
    peftkit.save_adapter(other, tmp_path / "r4")
    modules = list(model.modules())
    peftkit.swap_adapter(model, tmp_path / "r4", name="default")
    assert all(a is b for a, b in zip(model.modules(), modules))  # nothing rebuilt
    fresh = peftkit.load_adapter(base_model(), tmp_path / "r4")
    with torch.no_grad():
        assert (model(x).logits - fresh(x).logits).abs().max() <= 1e-6
        peftkit.save_adapter(model, tmp_path / "again", name="default")  # r 8 with zero ranks, the same outputs
        again = peftkit.load_adapter(base_model(), tmp_path / "again")
        assert (again(x).logits - fresh(x).logits).abs().max() <= 1e-6
    peftkit.apply_adapter(other, "lora", name="wide", r=16)
    peftkit.save_adapter(other, tmp_path / "r16", name="wide")
    with pytest.raises(AdapterError, match="rank 16, above the loaded adapter's 8"):
        peftkit.swap_adapter(model, tmp_path / "r16")
    with pytest.raises(AdapterError, match="does not adapt the same layers as 'default'"):
        peftkit.swap_adapter(model, peftkit.save_adapter(model, tmp_path / "b", name="b"), name="default")
