"""Training and evaluating the tasks that are not language modelling: a seq-cls head on SST-2
(tiny BERT) and an encoder-decoder on E2E or {source, target} rows (tiny T5), each loss curve
equal to the same recipe through peft, and the recipe errors of a task a model cannot do."""

import json
from pathlib import Path

import pytest
import torch
import yaml

import peftkit
from peftkit.data import Row, data_root, read_rows, tokenize_rows
from peftkit.data_tasks import source_text, tokenize_classes, tokenize_seq2seq
from peftkit.errors import ConfigError
from peftkit.evaluation import evaluate_model
from peftkit.evaluation.generation import generate
from peftkit.evaluation.spec import GenerationSettings
from peftkit.recipe import load_recipe
from peftkit.train import train

SST2 = data_root() / "sst2" / "train.tsv"


def write_recipe(tmp_path: Path, name: str = "recipe", **values) -> Path:
    recipe = {"adapter": "lora", "adapter_overrides": {"dropout": 0.0},
              "train": {"max_steps": 4, "batch_size": 4, "lr": 1.0e-2, "logging_steps": 1, "save_steps": 2, "seed": 5},
              "output": str(tmp_path / name), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_seq_cls_examples_are_bare_sentences_with_class_ids():
    _, tokenizer = peftkit.load_model("tiny-bert", task="seq-cls", num_labels=2)
    rows = [Row({"label": "1", "sentence": "a fine film "}, "x:2"), Row({"label": "0", "sentence": "dull"}, "x:3")]
    columns, stats = tokenize_classes(tokenizer, rows, "sst2", 64, 2, "x")
    assert columns["labels"] == [1, 0] and stats.examples == 2 and stats.trained_tokens == 2
    assert columns["input_ids"][0] == tokenizer("a fine film")["input_ids"]  # no instruction, no chat template
    cut, stats = tokenize_classes(tokenizer, rows, "sst2", 5, 2, "x")
    assert len(cut["input_ids"][0]) == 5 and stats.truncated == 1


@pytest.mark.parametrize("rows, num_labels, message", [
    ([{"label": "1", "sentence": "a"}], None, "num_labels: task seq-cls needs the number of classes; x has labels "
                                              "1: set num_labels: 2"),
    ([{"text": "a", "label": 3}], 2, r"num_labels: 2 does not match the labels of x \(3\).*set num_labels: 4"),
    ([{"text": "a", "label": "neutral"}], 2, "x:1: task seq-cls needs a 'label' field holding a class id"),
])
def test_bad_labels_are_one_line_errors(rows, num_labels, message):
    _, tokenizer = peftkit.load_model("tiny-bert", task="seq-cls", num_labels=2)
    fmt = "sst2" if "sentence" in rows[0] else "text"
    with pytest.raises(ConfigError, match="^" + message) as info:
        tokenize_classes(tokenizer, [Row(r, f"x:{i + 1}") for i, r in enumerate(rows)], fmt, 64, num_labels, "x")
    assert "\n" not in str(info.value)


def test_seq2seq_labels_are_the_target_only():
    _, tokenizer = peftkit.load_model("tiny-t5")
    rows = [Row({"mr": "name[Aromi]", "ref": "Aromi is a pub."}, "x:2")]
    columns, stats = tokenize_seq2seq(tokenizer, rows, "e2e", 512)
    source = source_text([{"role": "user", "content": "Write a short restaurant description in English from this "
                                                        "meaning representation:\nname[Aromi]"}])
    assert columns["input_ids"] == [tokenizer(source)["input_ids"]]
    assert columns["labels"] == [tokenizer("Aromi is a pub.")["input_ids"] + [tokenizer.eos_token_id]]
    assert stats.trained_tokens == len(columns["labels"][0])
    with pytest.raises(ConfigError, match="task seq2seq needs a source and a target, which text rows"):
        tokenize_seq2seq(tokenizer, [Row({"text": "a"}, "x:1")], "text", 512)


def test_seq2seq_format_trains_a_decoder_as_a_prompt_and_completion(tmp_path):
    _, tokenizer = peftkit.load_model("tiny-llama")
    columns, _ = tokenize_rows(tokenizer, [Row({"source": "2+2?", "target": "4"}, "x:1")], "seq2seq", 512)
    answer = [t for t, label in zip(columns["input_ids"][0], columns["labels"][0]) if label != -100]
    assert tokenizer.decode(answer) == "4<|im_end|>"


def test_seq_cls_recipe_trains_the_head_like_peft_and_evaluates_by_argmax(tmp_path):
    common = {"model": "tiny-bert", "task": "seq-cls", "num_labels": 2,
              "data": {"train": "sst2", "max_length": 64, "limit": 32}, "eval": {"tasks": ["sst2"], "limit": 40}}
    ours = train(load_recipe(str(write_recipe(tmp_path, "ours", **common))))
    theirs = train(load_recipe(str(write_recipe(tmp_path, "peft", impl="peft", **common))))
    a, b = losses(ours), losses(theirs)
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
    system = [json.loads((run / "system.json").read_text()) for run in (ours, theirs)]
    assert system[0]["trainable_parameters"] == system[1]["trainable_parameters"] > 2 * 64  # the head trains
    config = json.loads((ours / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["target_modules"] == ["query", "value"]
    result = json.loads((ours / "eval.json").read_text())["tasks"]["sst2"]
    assert result["n"] == 40 and "argmax" in result["details"]["scoring"]

    # the same number from the head by hand, after `peftkit eval` reloads the run from its recipe
    report, _ = peftkit.evaluation.eval_command(str(ours), use_cache=False)
    model, tokenizer = peftkit.load_model("tiny-bert", task="seq-cls", num_labels=2)
    peftkit.load_adapter(model, ours / "adapter")
    rows = read_rows(data_root() / "sst2" / "dev.tsv")[:40]
    with torch.no_grad():
        hits = sum(int(model(**tokenizer(r.fields["content"].strip(), return_tensors="pt")).logits.argmax())
                   == int(r.fields["label"]) for r in rows)
    assert report["tasks"]["sst2"]["metrics"]["accuracy"] == pytest.approx(100 * hits / 40)


def test_seq2seq_recipe_trains_like_peft_and_generates(tmp_path):
    common = {"model": "tiny-t5", "data": {"train": "e2e", "max_length": 96, "limit": 16},
              "eval": {"tasks": ["e2e", "alpaca-heldout"], "limit": 3}}
    ours = train(load_recipe(str(write_recipe(tmp_path, "ours", **common))))
    theirs = train(load_recipe(str(write_recipe(tmp_path, "peft", impl="peft", **common))))
    a, b = losses(ours), losses(theirs)
    assert len(a) == 4 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-4
    assert json.loads((ours / "adapter" / "adapter_config.json").read_text())["task_type"] == "SEQ_2_SEQ_LM"
    tasks = json.loads((ours / "eval.json").read_text())["tasks"]
    assert tasks["e2e"]["n"] == 3 and "bleu" in tasks["e2e"]["metrics"]
    assert tasks["alpaca-heldout"]["skipped"] == "it scores causal-lm models, and this model is seq2seq"


def test_encoder_decoder_generation_batched_equals_one_by_one():
    model, tokenizer = peftkit.load_model("tiny-t5")
    prompts = [tokenizer(text)["input_ids"] for text in ("name[Aromi]", "a much longer source, area[riverside]")]
    settings = GenerationSettings(max_new_tokens=6)
    batched = generate(model, tokenizer, prompts, settings, batch_size=2, progress=False)
    alone = [generate(model, tokenizer, [p], settings, batch_size=1, progress=False)[0] for p in prompts]
    with torch.no_grad():
        direct = model.generate(torch.tensor([prompts[1]]), max_new_tokens=6, do_sample=False)
    assert batched == alone and alone[1] == tokenizer.decode(direct[0], skip_special_tokens=True).strip()


@pytest.mark.parametrize("values, message", [
    ({"model": "tiny-llama", "task": "seq2seq"}, "task: model 'tiny-llama' (llama) cannot do task 'seq2seq'"),
    ({"model": "tiny-bert", "task": "seq2seq"}, "task: model 'tiny-bert' (bert) cannot do task 'seq2seq'"),
    ({"model": "tiny-bert", "task": "summarise"}, "task: must be one of causal-lm, seq-cls, token-cls, seq2seq"),
    ({"model": "tiny-llama", "num_labels": 3}, "task: num_labels=3 is for seq-cls and token-cls heads"),
    ({"model": "tiny-bert", "num_labels": 1}, "num_labels: must be >= 2"),
])
def test_recipe_task_errors_before_loading(tmp_path, values, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as info:
        load_recipe(str(write_recipe(tmp_path, data={"train": "sst2"}, **values)))
    assert "\n" not in str(info.value)


def test_token_cls_and_packing_refused_with_a_reason(tmp_path):
    token = write_recipe(tmp_path, model="tiny-bert", task="token-cls", data={"train": "sst2"})
    with pytest.raises(ConfigError, match="token-cls has no training data format yet"):
        train(load_recipe(str(token)))
    packed = write_recipe(tmp_path, "packed", model="tiny-t5", data={"train": "e2e", "packing": True})
    with pytest.raises(ConfigError, match="data.packing: task seq2seq trains one example per row"):
        train(load_recipe(str(packed)))


def test_eval_of_a_model_kind_a_task_cannot_score_is_skipped():
    model, tokenizer = peftkit.load_model("tiny-bert", task="seq-cls", num_labels=2)
    report = evaluate_model(model, tokenizer, "e2e", limit=2, use_cache=False, progress=False)
    assert report["tasks"]["e2e"]["skipped"] == "it scores causal-lm or seq2seq models, and this model is seq-cls"
