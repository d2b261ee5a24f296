"""Recipes: every shipped one validates; bad values fail before any model loads, naming the key."""

import pytest
import yaml

from peftkit.errors import ConfigError
from peftkit.models import REGISTRY
from peftkit.presets import builtin_names
from peftkit.recipe import load_recipe, parse_override

SHIPPED = builtin_names("recipes")


def test_the_issue_names_are_shipped():
    for name in ("lora-alpaca", "qlora-alpaca", "prefix-alpaca", "lora-sst2", "lora-e2e", "lora-sst2-minilm"):
        assert name in SHIPPED and f"{name}-smoke" in SHIPPED
    assert {"lora-alpaca-gemma3-smoke", "lora-alpaca-qwen2-smoke", "qlora-alpaca-qwen2-smoke",
            "prefix-alpaca-gemma3-smoke"} <= set(SHIPPED)


def test_new_family_recipes_name_their_model_and_task():
    minilm = load_recipe("lora-sst2-minilm")
    assert (minilm.model, minilm.task, minilm.num_labels, minilm.eval.limit) == ("minilm-l6", "seq-cls", 2, None)
    assert load_recipe("qlora-alpaca-qwen2-smoke").model == "qwen2.5-0.5b"
    assert load_recipe("prefix-alpaca-gemma3-smoke").adapter == "prefix"
    assert load_recipe("compare-models-smoke").models == ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_validate_both_impls(name):
    recipe = load_recipe(name)
    assert recipe.model in REGISTRY and recipe.output == f"runs/{name}"
    if any(method.get("adapter") == "full" for method in recipe.methods.values()):  # no adapter for peft to run
        with pytest.raises(ConfigError, match=r"^methods\.full.*: impl: adapter: full trains the model itself"):
            load_recipe(name, ["impl=peft"])
        return
    assert load_recipe(name, ["impl=peft"]).impl == "peft"


def test_overrides_are_typed():
    recipe = load_recipe("lora-alpaca", ["train.lr=1e-4", "eval.tasks=sst2,e2e", "adapter_overrides.r=16",
                                         "data.packing=true"])
    assert recipe.train.lr == 1e-4 and recipe.eval.tasks == ["sst2", "e2e"]
    assert recipe.adapter_overrides == {"dropout": 0.05, "r": 16} and recipe.data.packing is True


@pytest.mark.parametrize("override,message", [
    (["train.lrr=1"], "unknown key train.lrr: did you mean train.lr?"),
    (["trian.lr=1"], "unknown key trian: did you mean train?"),
    (["train.lr=-1"], "train.lr: must be in (0, 1), got -1.0"),
    (["train.batch_size=many"], "train.batch_size: expected an integer, got 'many'"),
    (["data.packing=maybe"], "data.packing: expected true/false, got 'maybe'"),
    (["impl=hf"], "impl: must be peftkit or peft, got 'hf'"),
    (["data.train=/no/such/file.json"], "data.train: no such file"),
    (["eval.tasks=sst3"], "eval.tasks: unknown task (did you mean sst2?)"),
    (["adapter=lroa"], "adapter: unknown adapter preset 'lroa': did you mean 'lora'?"),
    (["adapter_overrides.r=0"], "adapter: r must be a positive integer"),
    (["train.scheduler=cosin"], "train.scheduler: must be cosine, linear or constant"),
    (["lr"], "must look like key.path=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        load_recipe("lora-alpaca", override)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_unknown_recipe_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'lora-alpaca'"):
        load_recipe("lora-alpacca")
    path = tmp_path / "r.yaml"
    path.write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="train: expected a mapping, got list"):
        load_recipe(str(path))
    path.write_text("model: tiny-llama\ntrain: {lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(path))


def test_yaml_reads_exponents_as_numbers():
    assert parse_override("train.lr=1e-4") == (["train", "lr"], "1e-4")  # YAML 1.1 leaves it a string
    assert load_recipe("lora-alpaca", ["train.lr=1e-4"]).train.lr == pytest.approx(1e-4)


def test_every_shipped_yaml_opens_with_its_command():
    from peftkit.presets import builtin_dir

    for kind in ("recipes", "adapters"):
        for path in builtin_dir(kind).glob("*.yaml"):
            lines = path.read_text().splitlines()
            assert lines[0].startswith("# ") and any("peftkit" in line for line in lines[:4]), path
            assert isinstance(yaml.safe_load(path.read_text()), dict)


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    from peftkit.presets import builtin_dir

    kinds = {}
    for path in sorted((builtin_dir("recipes") / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = (str(config.distributed_type), config.num_processes)
    assert kinds == {"ddp": ("DistributedType.MULTI_GPU", 2), "fsdp": ("DistributedType.FSDP", 2),
                     "deepspeed-zero2": ("DistributedType.DEEPSPEED", 2),
                     "deepspeed-zero3": ("DistributedType.DEEPSPEED", 2)}
