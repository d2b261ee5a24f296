"""AdaLoRA's rank schedule against peft's on tiny-llama: the same budget at every step, the same
pruned ranks after 20 AdamW steps with the orthogonality penalty, saved adapters that load in
peft (and back) with their final ranks, and `peftkit train` running the schedule, equal to
`impl: peft` and resumable."""

import json
import shutil

import pytest
import torch
from peft import AdaLoraConfig, PeftModel, get_peft_model
from peft.tuners.adalora.layer import RankAllocator as PeftRankAllocator
from safetensors.torch import load_file

import peftkit
from peftkit.api import resolve_adapter
from peftkit.errors import ConfigError
from peftkit.methods import METHODS
from peftkit.methods.adalora import AdaLoRAConfig, RankAllocator, steps_of
from peftkit.recipe import load_recipe
from peftkit.train import train
from tests.conftest import randomize_adapter, token_batch, train_losses
from tests.test_train import write_recipe

SCHEDULE = {"init_r": 6, "target_r": 3, "total_step": 20, "tinit": 3, "tfinal": 5, "delta_t": 2}
METHOD = METHODS["adalora"]


def load() -> torch.nn.Module:
    return peftkit.load_model("tiny-llama", dtype="fp32", device="cpu")[0]


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_budget_schedule_is_peft_s():
    model = peftkit.apply_adapter(load(), "adalora", **{**SCHEDULE, "total_step": 50, "tinit": 4, "tfinal": 7,
                                                        "delta_t": 3})
    peft_config = AdaLoraConfig(init_r=6, target_r=3, total_step=50, tinit=4, tfinal=7, deltaT=3,
                                target_modules=["q_proj", "v_proj"])
    peft_model = get_peft_model(load(), peft_config)
    ours = RankAllocator(model, model.peftkit_config)
    theirs = PeftRankAllocator(peft_model.base_model.model, peft_config, "default")
    assert (ours.init_budget, ours.target_budget) == (theirs.init_bgt, theirs.target_bgt) == (24, 12)
    assert [ours.budget_schedule(s) for s in range(60)] == [theirs.budget_schedule(s) for s in range(60)]


def test_orthogonality_penalty_is_peft_s():
    torch.manual_seed(0)
    model = peftkit.apply_adapter(load(), "adalora", **SCHEDULE)
    randomize_adapter(model, std=0.3)
    peft_model = PeftModel.from_pretrained(load(), peftkit.save_adapter(model, "/tmp/peftkit-adalora-orth"),
                                           is_trainable=True)
    x = token_batch(model.config.vocab_size)
    ours = model(input_ids=x, labels=x).loss + METHOD.regularization(model)
    theirs = peft_model(input_ids=x, labels=x).loss  # peft adds the penalty inside its forward
    assert METHOD.regularization(model).item() > 0.1
    assert abs(ours.item() - theirs.item()) <= 1e-6
    shutil.rmtree("/tmp/peftkit-adalora-orth")


def test_schedule_prunes_as_peft_and_saves_final_ranks(tmp_path):
    torch.manual_seed(0)
    model = peftkit.apply_adapter(load(), "adalora", **SCHEDULE)
    randomize_adapter(model)
    peft_model = PeftModel.from_pretrained(load(), peftkit.save_adapter(model, tmp_path / "init"), is_trainable=True)
    allocator = METHOD.allocator(model)
    mine = train_losses(model, lr=3e-2, loss_term=METHOD.regularization, after_step=allocator.update_and_allocate)
    reference = train_losses(peft_model, lr=3e-2, after_step=peft_model.base_model.update_and_allocate)
    allocator.finish()
    assert mine[-1] < mine[0] - 0.05
    assert max(abs(a - b) for a, b in zip(mine, reference)) <= 1e-4

    pattern = METHOD.rank_pattern(model)
    peft_pattern = {k.replace(".default", ""): v for k, v in peft_model.peft_config["default"].rank_pattern.items()}
    assert pattern == peft_pattern
    assert sum(map(sum, pattern.values())) == 3 * 4  # target_r on average over the 4 layers
    assert len({sum(flags) for flags in pattern.values()}) > 1  # the budget moved between layers

    ours_dir = peftkit.save_adapter(model, tmp_path / "ours")
    peft_model.save_pretrained(tmp_path / "theirs")
    saved, peft_saved = (load_file(d / "adapter_model.safetensors") for d in (ours_dir, tmp_path / "theirs"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in peft_saved.items()}
    torch.testing.assert_close(saved, peft_saved, rtol=0, atol=1e-4)  # some layers keep no rank: (0, in) tensors

    x = token_batch(model.config.vocab_size)
    model.eval()
    reloaded = PeftModel.from_pretrained(load(), ours_dir)  # peft builds init_r layers, then cuts them to the pattern
    assert (logits(model, x) - logits(reloaded, x)).abs().max().item() <= 1e-5
    back = peftkit.load_adapter(load(), tmp_path / "theirs")
    assert (logits(back, x) - logits(PeftModel.from_pretrained(load(), tmp_path / "theirs"), x)).abs().max() <= 1e-5
    assert json.loads((ours_dir / "adapter_config.json").read_text())["rank_pattern"] == pattern
    peftkit.merge_adapter(back)  # a pruned adapter merges too
    assert (logits(back, x) - logits(reloaded, x)).abs().max().item() <= 1e-5


def test_config_errors():
    with pytest.raises(ConfigError, match="target_r .* must not exceed init_r"):
        AdaLoRAConfig(init_r=4, target_r=8)
    with pytest.raises(ConfigError, match="no pruning phase"):
        AdaLoRAConfig(total_step=10, tinit=6, tfinal=4)
    with pytest.raises(ConfigError, match=r"tinit must be whole steps >= 0 or a fraction of the run's steps in \[0, 1\)"):
        AdaLoRAConfig(tinit=1.5)
    with pytest.raises(ConfigError, match=r"tinit \(0.6\) and tfinal \(0.5\) leave no pruning phase"):
        AdaLoRAConfig(tinit=0.6, tfinal=0.5)


def test_fractions_of_the_run_become_whole_steps():
    """The paper spreads the schedule over the whole run: the preset's 10 % warm-up and 30 % final
    stretch become whole steps once the run's length is known."""
    assert (AdaLoRAConfig(tinit=0.1, tfinal=0.3, total_step=50).tinit, AdaLoRAConfig(tfinal=0.3, total_step=50).tfinal) \
        == (5, 15)
    preset = resolve_adapter("adalora")
    assert (preset.tinit, preset.tfinal, preset.total_step) == (0.1, 0.3, None)


def adalora_recipe(tmp_path, **train_section):
    return write_recipe(tmp_path, adapter="adalora",
                        adapter_overrides={"init_r": 6, "target_r": 3, "tinit": 0.125, "tfinal": 0.25, "delta_t": 1},
                        train={"max_steps": 8, "save_steps": 4, "lr": 2e-2, **train_section})


def test_train_runs_the_schedule_as_impl_peft(tmp_path):
    path = adalora_recipe(tmp_path)
    ours = train(load_recipe(str(path), [f"output={tmp_path / 'ours'}"]))
    theirs = train(load_recipe(str(path), ["impl=peft", f"output={tmp_path / 'theirs'}"]))
    configs = [json.loads((run / "adapter" / "adapter_config.json").read_text()) for run in (ours, theirs)]
    assert configs[0]["total_step"] == configs[1]["total_step"] == 8  # the run's steps
    assert [(c["tinit"], c["tfinal"]) for c in configs] == [(1, 2), (1, 2)]  # 1/8 and 1/4 of them
    assert configs[0]["rank_pattern"] == configs[1]["rank_pattern"]
    assert sum(map(sum, configs[0]["rank_pattern"].values())) == 3 * 4
    loss = lambda run: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert max(abs(a - b) for a, b in zip(loss(ours), loss(theirs))) <= 1e-3  # same init, same draws
    tensors = [load_file(run / "adapter" / "adapter_model.safetensors") for run in (ours, theirs)]
    torch.testing.assert_close(tensors[0], tensors[1], rtol=0, atol=1e-4)


def test_resume_restores_the_schedule(tmp_path):
    path = adalora_recipe(tmp_path)
    run = train(load_recipe(str(path)))
    straight = shutil.copytree(run, tmp_path / "straight")
    shutil.rmtree(run / "adapter")  # as if killed after checkpoint 4 (of 8)
    shutil.rmtree(run / "checkpoints" / "checkpoint-8")
    assert (run / "checkpoints" / "checkpoint-4" / "allocator.safetensors").is_file()
    resumed = train(load_recipe(str(path)), resume=True)
    a, b = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (straight, resumed))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_fractions_round_half_up_and_placeholders_fit():
    assert [AdaLoRAConfig(tinit=0.1, total_step=n).tinit for n in (5, 15, 25, 35)] == [1, 2, 3, 4]  # not to even
    mixed = AdaLoRAConfig(tinit=0.1, tfinal=200)  # before training: a schedule with a pruning phase, for peft
    total = mixed.placeholder_steps()
    assert steps_of(0.1, total) + 200 < total and steps_of(0.1, total - 1) + 200 >= total - 1  # the shortest: 223
