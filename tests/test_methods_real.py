"""Every method beyond LoRA on the real SmolLM2-135M (fp32) against peft: our saved adapter in
peft gives our logits within peft's own error on the same adapter (its merged model against
its unmerged one: reassociation alone moves real-model logits), and trainable counts equal."""

import pytest
import torch
from peft import PeftModel

import peftkit
from tests.conftest import randomize_adapter, token_batch
from tests.test_methods import CASES, peft_counts

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_model_parity_within_peft_s_own_error(case, smol_dir, tmp_path):
    load = lambda: peftkit.load_model("smollm2-135m", dtype="fp32", device="cpu")[0]  # noqa: E731
    model = peftkit.apply_adapter(load(), case, **CASES[case][0])
    randomize_adapter(model, std=0.02)
    model.eval()
    x = token_batch(model.config.vocab_size, length=32)
    peft_model = PeftModel.from_pretrained(load(), peftkit.save_adapter(model, tmp_path / "a"))
    assert peft_counts(PeftModel.from_pretrained(load(), tmp_path / "a", is_trainable=True)) == \
        peftkit.trainable_parameters(model)
    with torch.no_grad():
        ours, theirs = model(x).logits, peft_model(x).logits
        peft_merged = peft_model.merge_and_unload()(x).logits
    peft_error = (peft_merged - theirs).abs().max().item()
    assert (ours - load()(x).logits).abs().max().item() > 1e-3  # the adapter acts
    assert (ours - theirs).abs().max().item() <= max(peft_error, 1e-5), (case, peft_error)
