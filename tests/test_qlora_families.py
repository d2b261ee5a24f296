"""QLoRA on every family against bitsandbytes + peft: the same NF4 base (GPT-2's Conv1D
included, the heads kept full precision), our adapter read by peft on a bitsandbytes base, and
peft's read by us, with equal trainable counts."""

import pytest
import torch

import peftkit
from peftkit.nf4 import Linear4bit
from peftkit.peft_backend import bnb_quantize
from peftkit.targets import head_names, quantizable_names
from tests.conftest import randomize_adapter
from tests.test_families import FAMILIES, inputs, load, logits

bnb = pytest.importorskip("bitsandbytes")
from peft import PeftModel  # noqa: E402

QUANTIZED = ["gpt2", "qwen2", "gemma3", "bert-seq-cls", "t5"]


def ours_4bit(family: str) -> torch.nn.Module:
    name, task, _ = FAMILIES[family]
    return peftkit.load_model(name, task=task, dtype="fp32", device="cpu", quantize="nf4")[0]


@pytest.mark.parametrize("family", QUANTIZED)
def test_nf4_base_equals_bitsandbytes_and_keeps_heads(family):
    ours, reference = ours_4bit(family), bnb_quantize(load(family))
    names = quantizable_names(ours)
    assert names and all(isinstance(ours.get_submodule(n), Linear4bit) for n in names)
    heads = [n for n in head_names(ours) if isinstance(ours.get_submodule(n), torch.nn.Linear)]
    assert all(not isinstance(ours.get_submodule(n), Linear4bit) for n in heads)
    batch = inputs(family)
    assert (logits(ours, batch) - logits(reference, batch)).abs().max() <= 1e-5


@pytest.mark.parametrize("family", QUANTIZED)
def test_qlora_adapter_both_ways_with_bitsandbytes(family, tmp_path):
    model = peftkit.apply_adapter(ours_4bit(family), "qlora", r=4, alpha=8, dropout=0.0)
    randomize_adapter(model)
    batch = inputs(family)
    expected = logits(model, batch)
    directory = peftkit.save_adapter(model, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(bnb_quantize(load(family)), directory, is_trainable=True)
    assert (logits(theirs, batch) - expected).abs().max() <= 1e-4
    assert peftkit.trainable_parameters(model)[0] == theirs.get_nb_trainable_parameters()[0]

    theirs.save_pretrained(tmp_path / "theirs")  # peft's own save of the same adapter, read back by us
    reloaded = peftkit.load_adapter(ours_4bit(family), tmp_path / "theirs")
    assert (logits(reloaded, batch) - expected).abs().max() <= 1e-4


def test_t5_keeps_wo_in_full_precision_as_transformers_does():
    ours = ours_4bit("t5")
    assert type(ours.encoder.block[0].layer[1].DenseReluDense.wo) is torch.nn.Linear
    assert isinstance(ours.encoder.block[0].layer[1].DenseReluDense.wi, Linear4bit)
