"""`peftkit.combine` against the installed peft's `add_weighted_adapter`, on tiny-llama (and
tiny-gpt2 for Conv1D's fan_in_fan_out): every layer's combined (A, B), the new rank, alpha and
target modules, and the errors.

A case is (model name, source ranks, source target modules, extra LoraConfig fields, adapter
names, weights, combination, add_weighted_adapter options). Source lora_B are random normal.
"""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

import peftkit
from peftkit.combine import COMBINATIONS, check_sources, combine_layer, combined_alpha, combined_rank, combined_targets
from peftkit.errors import AdapterError

QV, QK = ["q_proj", "v_proj"], ["q_proj", "k_proj"]
AB, ABC = ["x", "y"], ["x", "y", "z"]
DENSITY = {"density": 0.5}
SEED = 1234

CASES = {name: ("tiny-llama", (4, 4), (QV, QV), {}, AB, [0.7, 0.4], name, DENSITY) for name in COMBINATIONS}
CASES |= {
    "ranks-cat": ("tiny-llama", (4, 2, 3), (QV, QV, QV), {}, ABC, [0.7, 0.4, -0.3], "cat", {}),
    "ranks-svd-clamp": ("tiny-llama", (4, 2, 3), (QV, QV, QV), {}, ABC, [0.7, 0.4, -0.3], "svd",
                        {"svd_rank": 3, "svd_clamp": 0.9}),
    "ranks-dare_ties_svd-reduced": ("tiny-llama", (4, 2), (QV, QV), {}, AB, [0.7, 0.4], "dare_ties_svd",
                                    {"density": 0.3, "majority_sign_method": "frequency", "svd_full_matrices": False}),
    "negative-ties-frequency": ("tiny-llama", (4, 4), (QV, QV), {}, AB, [0.7, -0.4], "ties",
                                {"density": 0.6, "majority_sign_method": "frequency"}),
    "negative-dare_linear": ("tiny-llama", (4, 4), (QV, QV), {}, AB, [-0.7, 0.4], "dare_linear", DENSITY),
    "density-1-dare_ties": ("tiny-llama", (4, 4), (QV, QV), {}, AB, [0.7, 0.4], "dare_ties", {"density": 1.0}),
    "targets-cat": ("tiny-llama", (4, 2), (QV, QK), {}, AB, [0.7, 0.4], "cat", {}),
    "targets-svd": ("tiny-llama", (4, 2), (QV, QK), {}, AB, [0.7, 0.4], "svd", {}),
    "targets-dare_ties": ("tiny-llama", (4, 4), (QV, QK), {}, AB, [0.7, 0.4], "dare_ties", DENSITY),
    "single-svd-is-linear": ("tiny-llama", (4,), (QV,), {}, ["x"], [0.5], "svd", {"svd_rank": 2}),
    "rslora-linear": ("tiny-llama", (4, 4), (QV, QV), {"use_rslora": True}, AB, [0.7, 0.4], "linear", {}),
    "conv1d-dare_linear_svd": ("tiny-gpt2", (4, 4), (["c_attn"],) * 2, {"fan_in_fan_out": True}, AB, [0.7, 0.4],
                               "dare_linear_svd", DENSITY),
    "conv1d-magnitude_prune_svd": ("tiny-gpt2", (4, 4), (["c_attn"],) * 2, {"fan_in_fan_out": True}, AB, [0.7, 0.4],
                                   "magnitude_prune_svd", DENSITY),
    "conv1d-ties": ("tiny-gpt2", (4, 4), (["c_attn"],) * 2, {"fan_in_fan_out": True}, AB, [0.7, 0.4], "ties", DENSITY),
}


def peft_model(name: str = "tiny-llama", ranks=(4, 4), targets=(QV, QV), **fields) -> torch.nn.Module:
    """A peft model with adapters "x", "y", ... (r, alpha 2r) and random normal lora_B."""
    torch.manual_seed(0)
    model = peftkit.load_model(name, dtype="fp32", device="cpu")[0]
    for adapter, r, target in zip("xyz", ranks, targets):
        config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=target, task_type="CAUSAL_LM", **fields)
        model = get_peft_model(model, config, adapter_name=adapter) if adapter == "x" else model
        if adapter != "x":
            model.add_adapter(adapter, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "lora_B" in key:
                torch.nn.init.normal_(param, generator=gen)
    return model


def adapted_layers(model: torch.nn.Module) -> list[LoraLayer]:
    """The LoRA layers in the order peft's add_weighted_adapter visits them."""
    return [m for key, m in model.base_model.model.named_modules() if "lora_" not in key and isinstance(m, LoraLayer)]


def sources(layer: LoraLayer, names: list[str]) -> list[tuple[torch.Tensor, torch.Tensor, float] | None]:
    return [(layer.lora_A[a].weight.detach().clone(), layer.lora_B[a].weight.detach().clone(), layer.scaling[a])
            if a in layer.lora_A else None for a in names]


def combine_both(model, names, weights, combination, options, monkeypatch) -> tuple[list, list, int]:
    """peft's and our (A, B) per layer, and our rank; both seeded right before their first draw
    (peft's after it initialises the new adapter, which draws too)."""
    layers = adapted_layers(model)
    before = [sources(layer, names) for layer in layers]
    inject = model.base_model.inject_adapter

    def seeded_inject(*args, **kwargs):
        inject(*args, **kwargs)
        torch.manual_seed(SEED)

    monkeypatch.setattr(model.base_model, "inject_adapter", seeded_inject)
    model.add_weighted_adapter(names, weights, "m", combination_type=combination, **options)
    rank = combined_rank([model.peft_config[a].r for a in names], combination, options.get("svd_rank"))
    torch.manual_seed(SEED)
    ours = [combine_layer(src, weights, combination, rank=rank, fan_in_fan_out=layer.fan_in_fan_out, **options)
            for src, layer in zip(before, layers)]
    theirs = [(layer.lora_A["m"].weight.detach(), layer.lora_B["m"].weight.detach()) for layer in layers]
    return ours, theirs, rank


@pytest.mark.parametrize("case", CASES)
def test_matches_peft(case, monkeypatch):
    name, ranks, targets, fields, names, weights, combination, options = CASES[case]
    model = peft_model(name, ranks, targets, **fields)
    ours, theirs, rank = combine_both(model, names, weights, combination, options, monkeypatch)
    assert ours and len(ours) == len(theirs)
    for (A, B), (A_peft, B_peft) in zip(ours, theirs):
        assert A.shape == A_peft.shape == (rank, A_peft.shape[1]) and B.shape == B_peft.shape
        assert A.dtype == A_peft.dtype and B.dtype == B_peft.dtype
        assert torch.equal(A, A_peft) and torch.equal(B, B_peft)  # the same ops in the same order: bit-exact
        assert (B_peft @ A_peft).abs().max() > 0
    new = model.peft_config["m"]
    assert new.r == rank and new.lora_alpha == combined_alpha(rank)
    assert combined_targets([model.peft_config[a].target_modules for a in names]) == sorted(new.target_modules)


def test_cat_is_exact_sum(monkeypatch):
    model = peft_model(ranks=(4, 2, 3), targets=(QV, QV, QV))
    ours, _, _ = combine_both(model, ABC, [0.7, 0.4, -0.3], "cat", {}, monkeypatch)
    for (A, B), layer in zip(ours, adapted_layers(model)):
        expected = sum(w * layer.get_delta_weight(a) for a, w in zip(ABC, [0.7, 0.4, -0.3]))
        torch.testing.assert_close(B @ A, expected, atol=1e-5, rtol=1e-5)


def test_rslora_inherited_scales_by_sqrt_rank(monkeypatch):
    """peft keeps the first source's use_rslora with alpha = r, so the new layers scale by sqrt(r)."""
    model = peft_model(use_rslora=True)
    combine_both(model, AB, [0.7, 0.4], "linear", {}, monkeypatch)
    assert model.peft_config["m"].use_rslora and model.peft_config["m"].lora_alpha == combined_alpha(4)
    assert all(layer.scaling["m"] == pytest.approx(math.sqrt(4)) for layer in adapted_layers(model))


def test_regex_targets_match_peft():
    model = peft_model(targets=(r".*\.q_proj", r".*\.v_proj"))
    model.add_weighted_adapter(AB, [0.7, 0.4], "m", combination_type="linear")
    assert combined_targets([r".*\.q_proj", r".*\.v_proj"]) == model.peft_config["m"].target_modules


def test_mixed_target_kinds_raise_like_peft():
    model = peft_model(targets=(r".*\.q_proj", QV))
    with pytest.raises(ValueError):
        model.add_weighted_adapter(AB, [0.7, 0.4], "m", combination_type="cat")
    with pytest.raises(AdapterError, match="regex"):
        combined_targets([r".*\.q_proj", QV])


@pytest.mark.parametrize("combination", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_unequal_ranks_raise_like_peft(combination):
    model = peft_model(ranks=(4, 2))
    with pytest.raises(ValueError, match="same r"):
        model.add_weighted_adapter(AB, [0.7, 0.4], "m", combination_type=combination, density=0.5)
    with pytest.raises(AdapterError, match="equal ranks") as err:
        combined_rank([4, 2], combination)
    assert "\n" not in str(err.value)


def test_unknown_combination_raises_like_peft():
    model = peft_model()
    with pytest.raises(ValueError, match="Invalid combination_type"):
        model.add_weighted_adapter(AB, [0.7, 0.4], "m", combination_type="mean")
    with pytest.raises(AdapterError, match="unknown combination 'mean'"):
        combined_rank([4, 4], "mean")
    with pytest.raises(AdapterError, match="unknown combination 'mean'"):
        combine_layer(sources(adapted_layers(model)[0], AB), [0.7, 0.4], "mean")


@pytest.mark.parametrize("density", [None, -0.1])
def test_density_peft_rejects(density):
    model = peft_model()
    with pytest.raises((TypeError, ValueError)):
        model.add_weighted_adapter(AB, [0.7, 0.4], "m", combination_type="ties", density=density)


@pytest.mark.parametrize("combination", ["ties", "dare_linear", "dare_ties_svd", "magnitude_prune_svd"])
@pytest.mark.parametrize("density", [None, -0.1, 0.0, 1.5])
def test_bad_density_raises(combination, density):
    layer_sources = sources(adapted_layers(peft_model())[0], AB)
    with pytest.raises(AdapterError, match="needs density in") as err:
        combine_layer(layer_sources, [0.7, 0.4], combination, density=density)
    assert "\n" not in str(err.value)


def test_bad_options_raise():
    layer_sources = sources(adapted_layers(peft_model())[0], AB)
    with pytest.raises(AdapterError, match="majority_sign_method"):
        combine_layer(layer_sources, [0.7, 0.4], "dare_ties", density=0.5, majority_sign_method="mean")
    with pytest.raises(AdapterError, match="svd_clamp"):
        combine_layer(layer_sources, [0.7, 0.4], "svd", svd_clamp=1.5)
    with pytest.raises(AdapterError, match="one weight per source"):
        combine_layer(layer_sources, [0.7], "linear")
    with pytest.raises(AdapterError, match="pass rank="):
        combine_layer([layer_sources[0], None], [0.7, 0.4], "cat")
    with pytest.raises(AdapterError, match="no source adapts"):
        combine_layer([None, None], [0.7, 0.4], "cat", rank=8)
    with pytest.raises(AdapterError, match="svd_rank"):
        combined_rank([4, 4], "svd", svd_rank=-1)


def test_dora_accepted_by_peft_rejected_here():
    model = peft_model(use_dora=True)
    model.add_weighted_adapter(AB, [0.7, 0.4], "m", combination_type="linear")
    assert model.peft_config["m"].use_dora  # peft copies the flag, keeps the new magnitude at its init
    with pytest.raises(AdapterError, match="'x' is DoRA"):
        check_sources(AB, [0.7, 0.4], [True, True])
    with pytest.raises(AdapterError, match="one weight per adapter"):
        check_sources(AB, [0.7], [False, False])
    check_sources(AB, [0.7, 0.4], [False, False])
