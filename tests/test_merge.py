"""`peftkit merge`: a plain transformers model equal to the adapter model, with its fidelity record."""

import json
import subprocess
import sys

import pytest
import torch

import peftkit
from peftkit.errors import AdapterError, ConfigError
from peftkit.merge import merge_to_dir
from tests.conftest import randomize_adapter, token_batch


def saved_adapter(tmp_path, preset="dora", **overrides):
    model, _ = peftkit.load_model("tiny-llama")
    peftkit.apply_adapter(model, preset, **overrides)
    randomize_adapter(model, std=0.05)
    return model, peftkit.save_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("preset", ["lora", "dora"])
def test_merged_model_loads_without_peftkit(tmp_path, preset):
    model, adapter = saved_adapter(tmp_path, preset, dropout=0.0)
    record = merge_to_dir(adapter, tmp_path / "merged")
    assert record["max_logit_diff_fp32"] <= 1e-5 and record["warning"] is None
    assert abs(record["perplexity_merged"] / record["perplexity_adapter"] - 1) < 1e-4
    x = token_batch(model.config.vocab_size)
    with torch.no_grad():
        expected = model(x).logits
    torch.save(x, tmp_path / "x.pt")  # test-side only; the script below mirrors a user without peftkit
    script = (
        "import sys, torch; sys.modules['peftkit'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'merged')!r})\n"
        f"AutoTokenizer.from_pretrained({str(tmp_path / 'merged')!r})\n"
        f"x = torch.load({str(tmp_path / 'x.pt')!r})\n"
        f"torch.save(m(x).logits.detach(), {str(tmp_path / 'out.pt')!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (torch.load(tmp_path / "out.pt") - expected).abs().max() <= 1e-5
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "Merge fidelity" in card and "max_logit_diff_fp32" in card
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["method"] == preset


def test_qlora_merges_into_dequantized_base_by_default(tmp_path):
    _, adapter = saved_adapter(tmp_path, "qlora", r=8, dropout=0.0)
    exact = merge_to_dir(adapter, tmp_path / "m4")
    gap = merge_to_dir(adapter, tmp_path / "mo", base="original")
    assert exact["merged_into"] == "4bit" and exact["max_logit_diff_fp32"] <= 1e-5
    assert gap["merged_into"] == "original" and gap["max_logit_diff_fp32"] > 100 * exact["max_logit_diff_fp32"]
    assert gap["warning"] and "serve the adapter unmerged" in gap["warning"]


def test_prefix_adapters_are_refused(tmp_path):
    model, _ = peftkit.load_model("tiny-llama")
    peftkit.apply_adapter(model, "prefix", num_virtual_tokens=4)
    adapter = peftkit.save_adapter(model, tmp_path / "p")
    with pytest.raises(AdapterError, match="cannot be merged.*ship the adapter directory"):
        merge_to_dir(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_output_is_never_overwritten_without_asking(tmp_path):
    _, adapter = saved_adapter(tmp_path)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="--overwrite"):
        merge_to_dir(adapter, tmp_path / "merged")
    assert (tmp_path / "merged" / "mine.txt").read_text() == "keep"
    merge_to_dir(adapter, tmp_path / "merged", overwrite=True, dtype="bf16")
    assert not (tmp_path / "merged" / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "merged"]


def test_fidelity_inputs_of_a_classifier_need_no_chat_template():
    """A BERT tokenizer has no chat template: a classifier's merge is measured on plain instructions."""
    from peftkit.merge import heldout_batches

    _, tokenizer = peftkit.load_model("tiny-bert", task="seq-cls", num_labels=2)
    tokenizer.chat_template = None
    batches = heldout_batches(tokenizer, limit=3, task="seq-cls")
    assert len(batches) == 3 and all(set(b) == {"input_ids"} and b["input_ids"].shape[0] == 1 for b in batches)
    with pytest.raises(ValueError, match="chat_template is not set"):
        heldout_batches(tokenizer, limit=3)  # a causal LM's perplexity needs the template its training used
