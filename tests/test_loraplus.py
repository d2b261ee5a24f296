"""LoRA+ against peft's `create_loraplus_optimizer`: the same groups, and the same 20 AdamW steps."""

import torch
from peft import PeftModel
from peft.optimizers import create_loraplus_optimizer

import peftkit
from peftkit.loraplus import loraplus_param_groups
from peftkit.recipe import TrainConfig
from tests.conftest import train_losses


def load():
    return peftkit.load_model("tiny-llama", dtype="fp32", device="cpu")[0]


def pair(tmp_path):
    torch.manual_seed(0)
    model = peftkit.apply_adapter(load(), "dora", r=4, alpha=8, dropout=0.0)
    directory = peftkit.save_adapter(model, tmp_path / "init")
    return model, PeftModel.from_pretrained(load(), directory, is_trainable=True)


def named_lrs(model, optimizer):
    """(lr, weight decay) per parameter, under our names (peft's without its wrapper and adapter name)."""
    names = {id(p): n for n, p in model.named_parameters()}
    lrs = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)].removeprefix("base_model.model.").replace(".default", "")
            lrs[name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")] = (group["lr"], group["weight_decay"])
    return lrs


def test_groups_and_steps_equal_peft(tmp_path):
    model, peft_model = pair(tmp_path)
    ours = torch.optim.AdamW(loraplus_param_groups(model, 1e-3, 16.0, 0.01))
    theirs = create_loraplus_optimizer(peft_model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0,
                                       loraplus_weight_decay=0.01)
    lrs = named_lrs(model, ours)
    assert lrs == named_lrs(peft_model, theirs)
    assert {lr for name, (lr, _) in lrs.items() if "lora_B" in name or "magnitude" in name} == {16e-3}
    assert {lr for name, (lr, _) in lrs.items() if "lora_A" in name} == {1e-3}
    mine, reference = train_losses(model, opt=ours), train_losses(peft_model, opt=theirs)
    assert mine[-1] < mine[0] - 0.05
    assert max(abs(a - b) for a, b in zip(mine, reference)) <= 1e-4


def test_recipe_key_is_checked():
    import pytest

    from peftkit.errors import ConfigError

    TrainConfig(loraplus_lr_ratio=16).check()
    with pytest.raises(ConfigError, match="loraplus_lr_ratio"):
        TrainConfig(loraplus_lr_ratio=-1).check()


def test_peftkit_train_uses_loraplus_groups(tmp_path):
    """Same seed and data: with LoRA+ the trained B moves further (16x its learning rate), A alike."""
    import pytest
    from safetensors.torch import load_file

    from peftkit.errors import ConfigError
    from peftkit.recipe import load_recipe
    from peftkit.train import train
    from tests.test_train import write_recipe

    recipe = str(write_recipe(tmp_path, adapter_overrides={"dropout": 0.0}, train={"lr": 1e-3}))
    runs = {ratio: train(load_recipe(recipe, [f"output={tmp_path / str(ratio)}", *(
        [f"train.loraplus_lr_ratio={ratio}"] if ratio else [])])) for ratio in (None, 16)}
    tensors = {ratio: load_file(run / "adapter" / "adapter_model.safetensors") for ratio, run in runs.items()}
    b_norm = {ratio: sum(t.norm() for k, t in ts.items() if "lora_B" in k) for ratio, ts in tensors.items()}
    assert b_norm[16] > 4 * b_norm[None]
    with pytest.raises(ConfigError, match="applies to LoRA adapters"):
        train(load_recipe(recipe, ["adapter=hira", f"output={tmp_path / 'h'}", "train.loraplus_lr_ratio=16"]))
