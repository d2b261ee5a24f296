"""combine_adapters on a model against peft's add_weighted_adapter on the same adapters: logits, ranks, errors."""

import pytest
import torch
from conftest import VOCAB, randomize_adapter, token_batch

import peftkit
from peftkit.errors import AdapterError
from peftkit.slots import view

SOURCES = {"x": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
           "y": {"r": 4, "alpha": 16, "target_modules": ["q_proj", "k_proj"]}}
COMBINATIONS = ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]


def base_model():
    return peftkit.load_model("tiny-llama")[0].eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two LoRA adapters with random tensors, saved in peft's format."""
    root = tmp_path_factory.mktemp("sources")
    for seed, (name, spec) in enumerate(SOURCES.items()):
        model = peftkit.apply_adapter(base_model(), "lora", **spec)
        randomize_adapter(model, seed=seed, std=0.1)
        peftkit.save_adapter(model, root / name)
    return root


def ours_and_peft(saved):
    from peft import PeftModel

    ours = base_model()
    for name in SOURCES:
        peftkit.load_adapter(ours, saved / name, name=name)
    theirs = PeftModel.from_pretrained(base_model(), saved / "x", adapter_name="x")
    theirs.load_adapter(saved / "y", adapter_name="y")
    return ours, theirs


@pytest.mark.parametrize("combination", COMBINATIONS)
def test_combination_equals_peft(saved, combination):
    ours, theirs = ours_and_peft(saved)
    x = token_batch(VOCAB)
    options = {"density": 0.5} if combination not in ("linear", "cat", "svd") else {}
    torch.manual_seed(7)  # DARE's masks: both draw after initialising the new adapter, in the same order
    theirs.add_weighted_adapter(["x", "y"], [0.7, 0.4], "m", combination_type=combination, **options)
    torch.manual_seed(7)
    peftkit.combine_adapters(ours, ["x", "y"], [0.7, 0.4], combination, name="m", **options)
    assert peftkit.adapter_config(ours, "m").r == theirs.peft_config["m"].r
    theirs.set_adapter("m")
    theirs.eval()  # peft 0.21 leaves the new adapter's dropout in training mode on an eval model; ours follows the model
    peftkit.set_adapter(ours, "m")
    assert not any(m.training for m in ours.modules())
    with torch.no_grad():
        assert (ours(x).logits - theirs(x).logits).abs().max() <= 1e-5
        assert not torch.allclose(ours(x).logits, base_model()(x).logits, atol=1e-3)  # the combination matters


def test_linear_is_the_weighted_sum_of_updates(saved):
    ours, _ = ours_and_peft(saved)
    peftkit.combine_adapters(ours, ["x", "y"], [0.7, 0.4], "cat", name="m")
    layer = ours.model.layers[0].self_attn.q_proj.layers
    expected = sum(w * layer[n].delta_weight() for n, w in (("x", 0.7), ("y", 0.4)))
    assert (layer["m"].delta_weight() - expected).abs().max() <= 1e-6


def test_combined_adapter_saves_and_loads_in_peft(saved, tmp_path):
    from peft import PeftModel

    ours, _ = ours_and_peft(saved)
    peftkit.combine_adapters(ours, ["x", "y"], [0.5, 0.5], "ties", density=0.5, name="m")
    peftkit.save_adapter(ours, tmp_path / "m", name="m")
    theirs = PeftModel.from_pretrained(base_model(), tmp_path / "m")
    x = token_batch(VOCAB)
    with torch.no_grad(), view(ours, "m"):
        assert (ours(x).logits - theirs(x).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("kwargs, message", [
    ({"names": ["x", "y"], "weights": [1.0]}, "weight"),
    ({"names": ["x", "q"], "weights": [1.0, 1.0]}, "no adapter named 'q'"),
    ({"names": ["x", "y"], "weights": [1.0, 1.0], "combination": "ties"}, "needs density"),
    ({"names": ["x", "y"], "weights": [1.0, 1.0], "combination": "mean"}, "unknown combination 'mean'"),
    ({"names": ["x", "y"], "weights": [1.0, 1.0], "name": "x"}, "is one of its sources"),
    ({"names": ["x", "x"], "weights": [1.0, 1.0]}, "a source twice"),
])
def test_bad_combinations_are_one_line(saved, kwargs, message):
    ours, _ = ours_and_peft(saved)
    with pytest.raises(AdapterError, match=message) as info:
        peftkit.combine_adapters(ours, **kwargs)
    assert "\n" not in str(info.value) and list(peftkit.adapters(ours)) == ["x", "y"]


def test_linear_needs_equal_ranks_and_lora(saved):
    ours, _ = ours_and_peft(saved)
    peftkit.apply_adapter(ours, "lora", name="wide", r=8)
    peftkit.apply_adapter(ours, "ia3", name="scales")
    with pytest.raises(AdapterError, match="rank"):
        peftkit.combine_adapters(ours, ["x", "wide"], [0.5, 0.5], "linear")
    with pytest.raises(AdapterError, match="'scales' is ia3"):
        peftkit.combine_adapters(ours, ["x", "scales"], [0.5, 0.5], "cat")
    peftkit.combine_adapters(ours, ["x", "wide"], [0.5, 0.5], "cat", name="both")
    assert peftkit.adapter_config(ours, "both").r == 12


@pytest.mark.slow
def test_real_model_combination_and_mixed_batch_within_peft_error(smol_dir, tmp_path):
    """SmolLM2-135M: ties / dare_ties combinations and a mixed batch against peft, each held to
    peft's own error on the same adapters (its mixed batch against its rows run alone)."""
    from peft import PeftModel

    def smol():
        return peftkit.load_model("smollm2-135m", dtype="fp32", device="cpu")[0].eval()

    for seed, name in enumerate(("x", "y")):
        model = peftkit.apply_adapter(smol(), "lora", r=8, target_modules=["q_proj", "v_proj", "down_proj"])
        randomize_adapter(model, seed=seed, std=0.02)
        peftkit.save_adapter(model, tmp_path / name)
    ours = smol()
    theirs = PeftModel.from_pretrained(smol(), tmp_path / "x", adapter_name="x")
    theirs.load_adapter(tmp_path / "y", adapter_name="y")
    for name in ("x", "y"):
        peftkit.load_adapter(ours, tmp_path / name, name=name)
    x = token_batch(49152, batch=3, length=24)
    rows = ["x", "__base__", "y"]
    with torch.no_grad():
        ours_mixed, theirs_mixed = ours(x, adapter_names=rows).logits, theirs(x, adapter_names=rows).logits
        peft_error = max((theirs_mixed[i] - theirs(x[i:i + 1], adapter_names=[n]).logits[0]).abs().max().item()
                         for i, n in enumerate(rows))
        ours_error = max((ours_mixed[i] - ours(x[i:i + 1], adapter_names=[n]).logits[0]).abs().max().item()
                         for i, n in enumerate(rows))
        assert ours_error <= max(peft_error, 1e-5)
        assert (ours_mixed - theirs_mixed).abs().max() <= max(peft_error, 1e-5)  # measured: 0.0 and peft's 0.0
        for combination in ("ties", "dare_ties"):
            torch.manual_seed(3)
            theirs.add_weighted_adapter(["x", "y"], [1.0, 1.0], combination, combination_type=combination, density=0.5)
            torch.manual_seed(3)
            peftkit.combine_adapters(ours, ["x", "y"], [1.0, 1.0], combination, density=0.5, name=combination)
            theirs.set_adapter(combination)
            theirs.eval()
            peftkit.set_adapter(ours, combination)
            diff = (ours(x).logits - theirs(x).logits).abs().max().item()
            assert diff <= max(peft_error, 1e-5), (combination, diff, peft_error)
