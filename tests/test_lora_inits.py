"""LoRA initialisations from the base weight: PiSSA and OLoRA against peft's (the same A, B and
residual base; saved converted to plain LoRA as peft converts them), and LoftQ against its
algorithm with bitsandbytes' NF4 (peft's LoftQ runs on CUDA only), on tiny-llama, fp32."""

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

import peftkit
from peftkit.errors import ConfigError
from peftkit.methods.lora import LoRALinear, loftq
from peftkit.nf4 import Linear4bit
from tests.conftest import randomize_adapter, token_batch

TOL = 1e-5


def load() -> torch.nn.Module:
    return peftkit.load_model("tiny-llama", dtype="fp32", device="cpu")[0]


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def peft_lora(init: str) -> torch.nn.Module:
    return get_peft_model(load(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=init, task_type="CAUSAL_LM"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_start_equals_peft_s(init):
    model = peftkit.apply_adapter(load(), "lora", r=8, alpha=16, init=init)
    theirs = peft_lora(init)
    ours_state = {k.replace(".base.", ".base_layer."): v for k, v in model.state_dict().items()}
    peft_state = {k.removeprefix("base_model.model.").replace(".default", ""): v
                  for k, v in theirs.state_dict().items()}
    assert ours_state.keys() == peft_state.keys()
    torch.testing.assert_close(ours_state, peft_state, rtol=0, atol=1e-6)  # A, B and the residual base
    x = token_batch(model.config.vocab_size)
    assert (logits(model, x) - logits(load(), x)).abs().max().item() <= TOL  # base + adapter = the model
    layer = model.model.layers[0].self_attn.q_proj
    assert (layer.base.weight - load().model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-2  # base moved


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_saves_as_plain_lora_as_peft_converts(init, tmp_path):
    model = peftkit.apply_adapter(load(), "lora", r=8, alpha=16, init=init)
    theirs = peft_lora(init)
    theirs.save_pretrained(tmp_path / "initial")  # peft's conversion needs the start saved first
    randomize_adapter(model)
    copy_adapter(model, theirs)  # the same trained adapter on the same start
    directory = peftkit.save_adapter(model, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    torch.testing.assert_close(load_file(directory / "adapter_model.safetensors"),
                               load_file(tmp_path / "converted" / "adapter_model.safetensors"), rtol=0, atol=1e-6)
    x = token_batch(model.config.vocab_size)
    on_original = PeftModel.from_pretrained(load(), directory)  # plain LoRA r16 on the untouched base
    assert on_original.peft_config["default"].r == 16
    assert (logits(model, x) - logits(on_original, x)).abs().max().item() <= TOL
    assert (logits(model, x) - logits(peftkit.load_adapter(load(), directory), x)).abs().max().item() <= TOL
    assert (logits(model, x) - logits(load(), x)).abs().max().item() > 1e-3


def test_peft_s_unconverted_pissa_loads_by_rebuilding_the_residual(tmp_path):
    theirs = peft_lora("pissa")
    trained = peftkit.apply_adapter(load(), "lora", r=8, alpha=16, init="pissa")
    randomize_adapter(trained)
    copy_adapter(trained, theirs)
    theirs.save_pretrained(tmp_path / "raw")  # init_lora_weights: pissa, the residual left to the loader
    model = peftkit.load_adapter(load(), tmp_path / "raw")
    x = token_batch(model.config.vocab_size)
    assert (logits(model, x) - logits(theirs, x)).abs().max().item() <= TOL


def test_pissa_merges_unmerges_and_unloads_to_the_original_base():
    model = peftkit.apply_adapter(load(), "lora-pissa")
    randomize_adapter(model)
    x = token_batch(model.config.vocab_size)
    before = logits(model, x)
    peftkit.merge_adapter(model)
    assert (logits(model, x) - before).abs().max().item() <= TOL
    peftkit.unmerge_adapter(model)
    bare = peftkit.methods.METHODS["lora"].unload(model)  # unmerged: the base gets W back, not the residual
    assert (logits(bare, x) - logits(load(), x)).abs().max().item() <= TOL


@torch.no_grad()
def copy_adapter(model: torch.nn.Module, peft_model: torch.nn.Module) -> None:
    """Our LoRA A and B into peft's model, layer by layer."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(module.lora_A.weight)
            target.lora_B["default"].weight.copy_(module.lora_B.weight)


def bnb_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' NF4 quantise + dequantise (block 64, no double quantisation) on CPU."""
    packed, state = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=64, compress_statistics=False,
                                                 quant_type="nf4")
    return bnb.functional.dequantize_4bit(packed, state).float()


def reference_loftq(weight: torch.Tensor, r: int, scale: float, iterations: int):
    """LoftQ's algorithm 1 written out: Q_t = q(W - scale B A), (A, B) = SVD_r(W - Q_t) / scale."""
    product = torch.zeros_like(weight)
    for _ in range(iterations):
        quantized = bnb_round_trip(weight - product)
        u, s, vh = torch.linalg.svd(weight - quantized, full_matrices=False)
        product = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    return quantized, product


@pytest.mark.parametrize("iterations", [1, 3])
def test_loftq_follows_the_algorithm_with_bitsandbytes_nf4(iterations):
    weight = load().model.layers[0].mlp.up_proj.weight.detach()  # (128, 64)
    last, weight_a, weight_b = loftq(weight, 8, 0.5, iterations, bnb_round_trip)
    quantized, product = reference_loftq(weight, 8, 0.5, iterations)
    torch.testing.assert_close(bnb_round_trip(last), quantized, rtol=0, atol=1e-6)  # the base: Q_T
    torch.testing.assert_close(0.5 * weight_b @ weight_a, product, rtol=0, atol=1e-5)
    start = (weight - quantized - product).norm()
    assert start < (weight - bnb_round_trip(weight)).norm() * 0.9  # nearer W than NF4(W) alone


def test_qlora_loftq_starts_nearer_the_full_model_and_reloads(tmp_path):
    full = load()
    x = token_batch(full.config.vocab_size)
    errors = {}
    for name, overrides in {"qlora": {}, "loftq": {"init": "loftq"}, "loftq3": {"init": "loftq", "loftq_iter": 3}}.items():
        model = peftkit.apply_adapter(load(), "qlora", r=8, alpha=16, dropout=0.0, **overrides)
        assert any(isinstance(m.base, Linear4bit) for m in model.modules() if isinstance(m, LoRALinear))
        errors[name] = (logits(model, x) - logits(full, x)).abs().mean().item()
        if name != "qlora":  # a saved LoftQ adapter reloads onto the same 4-bit base
            randomize_adapter(model)
            back = peftkit.load_adapter(load(), peftkit.save_adapter(model, tmp_path / name))
            assert (logits(back, x) - logits(model, x)).abs().max().item() <= TOL
    # a random tiny model's flat spectrum leaves little for rank 8 to take (real models: the closing note)
    assert errors["loftq"] < 0.85 * errors["qlora"] and errors["loftq3"] < errors["qlora"]


def test_init_errors():
    with pytest.raises(ConfigError, match="4-bit base cannot hold"):
        peftkit.apply_adapter(load(), "qlora", init="pissa")
    with pytest.raises(ConfigError, match="quantize: nf4"):
        peftkit.apply_adapter(load(), "lora", init="loftq")
    with pytest.raises(ConfigError, match="dora: false"):
        peftkit.apply_adapter(load(), "lora", init="olora", dora=True)
