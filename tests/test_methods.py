"""Every method beyond LoRA against the installed peft, on tiny-llama: logits through each other's
saved adapters, trainable counts, 20 AdamW steps from identical weights, and merge / unmerge.

A case is (our preset overrides, peft's config class name and fields for the same adapter,
peft's fields that give a non-trivial fresh adapter, the learning rate of the 20 steps).
"""

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model

import peftkit
from peftkit.errors import AdapterError
from peftkit.methods import METHODS
from peftkit.methods.layer import AdapterLayer
from tests.conftest import randomize_adapter, token_batch, train_losses

CASES = {
    "hira": ({"r": 4, "target_modules": ["q_proj", "v_proj"]},
             ("HiraConfig", {"r": 4, "target_modules": ["q_proj", "v_proj"]}), {"init_weights": False}, 1.0),
    "ia3": ({}, ("IA3Config", {"target_modules": ["k_proj", "v_proj", "down_proj"], "feedforward_modules": ["down_proj"]}),
            {"init_ia3_weights": False}, 0.3),
    "loha": ({"r": 4, "alpha": 8}, ("LoHaConfig", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
             {"init_weights": False}, 1e-2),
    "lokr": ({"r": 2, "alpha": 4, "decompose_both": True},
             ("LoKrConfig", {"r": 2, "alpha": 4, "decompose_both": True, "target_modules": ["q_proj", "v_proj"]}),
             {"init_weights": False}, 0.1),
    "vera": ({"r": 8}, ("VeraConfig", {"r": 8, "target_modules": ["q_proj", "v_proj"]}), {"init_weights": False}, 0.3),
    "adalora": ({"init_r": 6, "target_r": 3, "total_step": 20, "tinit": 3, "tfinal": 5, "delta_t": 2},
                ("AdaLoraConfig", {"init_r": 6, "target_r": 3, "total_step": 20, "tinit": 3, "tfinal": 5, "deltaT": 2,
                                   "target_modules": ["q_proj", "v_proj"]}), {"init_lora_weights": False}, 3e-2),
}
SCHEDULED = {"adalora"}  # their loss curves run the rank schedule: tests/test_adalora.py
TOL = 1e-5


def load(name: str = "tiny-llama") -> torch.nn.Module:
    return peftkit.load_model(name, dtype="fp32", device="cpu")[0]


def ours(case: str, name: str = "tiny-llama") -> torch.nn.Module:
    return peftkit.apply_adapter(load(name), case, **CASES[case][0])


def theirs(case: str, name: str = "tiny-llama", **extra) -> torch.nn.Module:
    class_name, fields = CASES[case][1]
    return get_peft_model(load(name), getattr(peft, class_name)(task_type="CAUSAL_LM", **fields, **extra))


def peft_counts(peft_model: torch.nn.Module) -> tuple[int, int]:
    """peft's (trainable, total) parameters, less AdaLoRA's frozen divisor `ranknum` (a parameter of
    one element per layer in peft, a buffer in ours)."""
    trainable, total = peft_model.get_nb_trainable_parameters()
    return trainable, total - sum(p.numel() for n, p in peft_model.named_parameters() if "ranknum" in n)


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("case", CASES)
def test_ours_loads_in_peft(case, tmp_path):
    model = ours(case)
    randomize_adapter(model)
    x = token_batch(model.config.vocab_size)
    directory = peftkit.save_adapter(model, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(load(), directory)
    assert (logits(model, x) - logits(peft_model, x)).abs().max().item() <= TOL
    assert (logits(model, x) - logits(load(), x)).abs().max().item() > 1e-3  # the adapter does something


@pytest.mark.parametrize("case", CASES)
def test_peft_loads_in_ours(case, tmp_path):
    torch.manual_seed(0)
    peft_model = theirs(case, **CASES[case][2])
    x = token_batch(peft_model.config.vocab_size)
    peft_model.save_pretrained(tmp_path / "theirs")
    model = peftkit.load_adapter(load(), tmp_path / "theirs")
    assert model.peftkit_config.method == case
    assert (logits(model, x) - logits(peft_model, x)).abs().max().item() <= TOL


@pytest.mark.parametrize("case", CASES)
def test_fresh_adapter_is_identity_and_counts_equal_peft(case):
    model = ours(case)
    x = token_batch(model.config.vocab_size)
    assert (logits(model, x) - logits(load(), x)).abs().max().item() <= TOL
    assert peftkit.trainable_parameters(model) == peft_counts(theirs(case))


@pytest.mark.parametrize("case", sorted(CASES.keys() - SCHEDULED))
def test_loss_curves_equal_peft(case, tmp_path):
    torch.manual_seed(0)
    model = ours(case)
    randomize_adapter(model)  # away from an identity start, where some gradients vanish
    directory = peftkit.save_adapter(model, tmp_path / "init")
    peft_model = PeftModel.from_pretrained(load(), directory, is_trainable=True)
    lr = CASES[case][3]  # on a random tiny model, HiRA, IA3 and VeRA need large steps to move the loss
    mine, reference = train_losses(model, lr=lr), train_losses(peft_model, lr=lr)
    assert mine[-1] < mine[0] - 0.05  # it learns
    assert max(abs(a - b) for a, b in zip(mine, reference)) <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_unmerged_and_unmerge_restores(case):
    model = ours(case)
    randomize_adapter(model)
    model.eval()
    x = token_batch(model.config.vocab_size)
    before = logits(model, x)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    if not METHODS[case].mergeable:
        with pytest.raises(AdapterError, match="cannot be merged"):
            peftkit.merge_adapter(model)
        return
    peftkit.merge_adapter(model)
    assert (logits(model, x) - before).abs().max().item() <= TOL
    with pytest.raises(AdapterError, match="already merged"):
        peftkit.merge_adapter(model)
    peftkit.unmerge_adapter(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=1e-6)
    merged = peftkit.merge_adapter(model, unload=True)
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert (logits(merged, x) - before).abs().max().item() <= TOL


@pytest.mark.parametrize("case", CASES)
def test_impl_peft_builds_the_same_adapter(case):
    """`impl: peft` turns our preset into peft's config: the same class, layers and trainable count."""
    from peftkit.api import resolve_adapter
    from peftkit.peft_backend import apply_peft

    peft_model = apply_peft(load(), resolve_adapter(case, **CASES[case][0]))
    assert type(peft_model.peft_config["default"]).__name__ == CASES[case][1][0]
    assert peft_counts(peft_model) == peftkit.trainable_parameters(ours(case))


def test_lokr_factorization_is_peft_s():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    from peftkit.methods.lokr import factorization

    for dimension in (1, 2, 7, 12, 64, 96, 127, 576, 1536, 4096, 4608):
        for factor in (-1, 2, 4, 8, 16, 5):
            assert factorization(dimension, factor) == peft_factorization(dimension, factor), (dimension, factor)


@pytest.mark.parametrize("case", ["loha", "lokr"])
def test_rank_and_module_dropout_draw_as_peft(case, tmp_path):
    """Same seed, same dropped rows and skipped modules: training-mode outputs equal peft's."""
    dropouts = {"rank_dropout": 0.3, "module_dropout": 0.2}
    model = peftkit.apply_adapter(load(), case, **CASES[case][0], **dropouts)
    randomize_adapter(model)
    peft_model = PeftModel.from_pretrained(load(), peftkit.save_adapter(model, tmp_path / "a"), is_trainable=True)
    assert peft_model.peft_config["default"].rank_dropout == 0.3
    x = token_batch(model.config.vocab_size)
    outputs = []
    for m in (model, peft_model):
        m.train()
        torch.manual_seed(1)
        outputs.append(torch.stack([m(x).logits for _ in range(3)]))
    assert (outputs[0] - outputs[1]).abs().max().item() <= TOL
    model.eval()
    assert (outputs[0][0] - logits(model, x)).abs().max().item() > 1e-4  # dropout changed something
