"""Tuning inside a study (`tune:`): trials on a dev split carved from the training data, the best
setting trained once per seed, and the eval data read only by the final runs."""

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

import peftkit
from peftkit.data import Row, resolve_source
from peftkit.errors import ConfigError
from peftkit.recipe import load_recipe, method_recipes
from peftkit.selection import split_dev, steps_at, still_rising
from peftkit.study import train_methods, tune_methods
from peftkit.tune import DIVERGED, check_tune, choose, grid_points, tuning_record


def write_study(tmp_path: Path, **extra) -> Path:
    recipe = {
        "model": "tiny-llama", "adapter": "lora",
        "data": {"train": ["sst2", "e2e"], "max_length": 512, "limit": 24},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1.0e-2, "seed": 3},
        "eval": {"tasks": ["sst2"], "limit": 4},
        "output": str(tmp_path / "study"), "seeds": [1, 2],
        "tune": {"grid": {"train.lr": [1.0e-3, 1.0e-2, 3.0e-2]}, "select": "sst2/accuracy", "dev_fraction": 0.25},
        "methods": {"lora": {"adapter": "lora"},
                    "ia3": {"adapter": "ia3", "tune": {"grid": {"train.lr": [3.0e-3, 3.0e-2, 1.0e-1],
                                                                "adapter_overrides.target_modules": [["k_proj"]]}}},
                    "vera": {"adapter": "vera", "tune": {"grid": {"train.lr": [1.0e-3, 1.0e-2, 1.0e-1]}}}},
        **extra,
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def test_trials_take_their_grid_point_and_finals_take_the_chosen_one(tmp_path):
    recipe = load_recipe(str(write_study(tmp_path, methods={
        "lora": {"adapter": "lora"}, "vera": {"adapter": "vera", "tune": {"grid": {"train.lr": [1e-3, 1e-2, 1e-1]}}}})))
    trials = check_tune(recipe)
    assert [point for point, _ in trials["vera"]] == [{"train.lr": v} for v in (1e-3, 1e-2, 1e-1)]
    for name, found in trials.items():
        for k, (point, run) in enumerate(found, 1):
            assert run.train.lr == point["train.lr"] and run.train.seed == 3  # the recipe's seed, not a final seed
            assert run.eval.tasks == []  # a trial never runs an eval task: the eval data is the final runs' only
            assert run.selection.metric == "sst2/accuracy" and run.selection.dev_fraction == 0.25
            assert run.output == str(tmp_path / "study" / "tune" / name / f"trial-{k}")
    finals = method_recipes(recipe, {"lora": {"train.lr": 3e-2}, "vera": {"train.lr": 1e-1}})
    assert list(finals) == ["lora-seed1", "lora-seed2", "vera-seed1", "vera-seed2"]
    assert [r.train.lr for r in finals.values()] == [3e-2, 3e-2, 1e-1, 1e-1]
    assert [r.train.seed for r in finals.values()] == [1, 2, 1, 2]
    assert {r.selection.metric for r in finals.values()} == {"sst2/accuracy"}  # convergence is read from it
    assert finals["lora-seed1"].eval.tasks == ["sst2"]
    both = check_tune(load_recipe(str(write_study(tmp_path, models=["tiny-qwen2", "tiny-gpt2"], methods={
        "lora": {}, "vera": {"adapter": "vera", "tune": {"grid": {"train.lr": [1e-3, 1e-2, 1e-1]}}}}))))
    assert list(both) == ["tiny-qwen2-lora", "tiny-qwen2-vera", "tiny-gpt2-lora", "tiny-gpt2-vera"]
    assert [run.model for _, run in both["tiny-gpt2-vera"]] == ["tiny-gpt2"] * 3
    assert grid_points({"a": [1, 2], "b": ["x", "y"]}) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"},
                                                          {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]


@pytest.mark.parametrize("change, message", [
    ({"tune": {"grid": {"train.lrr": [1e-3]}, "select": "sst2/accuracy"}},
     "tune.grid: unknown recipe key train.lrr: did you mean train.lr?"),
    ({"tune": {"grid": {"optimizer": [1]}, "select": "sst2/accuracy"}}, "tune.grid: unknown recipe key optimizer"),
    ({"tune": {"grid": {}, "select": "sst2/accuracy"}}, "tune.grid: needs at least one recipe key"),
    ({"tune": {"grid": {"train.lr": []}, "select": "sst2/accuracy"}}, "tune.grid.train.lr: expected a non-empty list"),
    ({"tune": {"grid": {"train.lr": [1e-3]}, "select": "e2e/bleu"}},
     "tune.select: no eval task of the recipe produces it (eval.tasks: sst2): add e2e to eval.tasks"),
    ({"tune": {"grid": {"train.lr": [1e-3]}, "select": "sst2/bleu"}},
     "tune.select: the sst2 task produces accuracy, f1_macro, not 'bleu'"),
    ({"tune": {"grid": {"train.lr": [1e-3]}, "select": "accuracy"}}, "tune.select: expected <eval task>/<metric>"),
    ({"tune": {"grid": {"train.lr": [1e-3]}, "select": "sst2/accuracy", "dev_fraction": 0.6}},
     "tune.dev_fraction: must be a number in (0, 0.5], got 0.6"),
    ({"tune": {"grid": {"train.lr": [1e-3]}, "select": "sst2/accuracy", "dev_fraction": 0}},
     "tune.dev_fraction: must be a number in (0, 0.5], got 0"),
    ({"tune": {"grid": {"train.lr": [1e-3]}}}, "tune.select: is required"),
    ({"tune": {"grid": {"train.lr": [1e-3]}, "select": "sst2/accuracy", "halving": True}}, "tune: unknown keys"),
    ({"tune": {"grid": {"train.lr": [1e-3]}, "select": "sst2/accuracy"}, "methods": {}},
     "tune: tunes each method of a study: list the methods under methods:"),
    ({"tune": {"grid": {"seeds": [[1]]}, "select": "sst2/accuracy"}}, "tune.grid: seeds cannot be tuned"),
    ({"tune": {"grid": {"train.lr": [1e-3, 1e-3]}, "select": "sst2/accuracy"}},
     "tune.grid.train.lr: lists a value twice"),
    ({"methods": {"lora": {}, "ia3": {"adapter": "ia3", "tune": {"grid": {"train.lr": [1e-3, 1e-2]}}}}},
     "methods.ia3.tune.grid: gives 2 trials and the study's grid 3: every method gets the same number of trials"),
    ({"methods": {"lora": {"tune": {"grid": {"train.lr": [1]}, "select": "e2e/bleu"}}}},
     "methods.lora.tune: a method's tune holds its own grid only"),
    ({"tune": {"grid": {"adapter_overrides.r": [0]}, "select": "sst2/accuracy"}, "methods": {"lora": {}}},
     "methods.lora, trial 1 {'adapter_overrides.r': 0}: adapter: r must be a positive integer"),
    ({"data": {"train": "e2e", "limit": 24}},
     "selection.metric: scores sst2 rows, and no data.train source has format sst2"),
    ({"tune": {}, "methods": {"lora": {"tune": {"grid": {"train.lr": [1e-3]}}}}},
     "methods.lora.tune: needs the study's tune: {grid, select}"),
    ({"tune": {"grid": {"data.eval_fraction": [0.01]}, "select": "sst2/accuracy"}},
     "tune.grid: data.eval_fraction cannot be tuned"),
    ({"tune": {"grid": {"model": ["tiny-gpt2"]}, "select": "sst2/accuracy"}}, "tune.grid: model cannot be tuned"),
    ({"data": {"train": "sst2", "eval_fraction": 0.01}}, "data.eval_fraction: a study with tune keeps each eval"),
    ({"tune": {"grid": {"train.lr": [1e-3]}, "select": "sst2/accuracy", "points": 1}},
     "tune.points: must be a whole number >= 2, got 1"),
])
def test_bad_tune_sections_fail_before_any_training(tmp_path, change, message):
    with pytest.raises(ConfigError) as info:
        load_recipe(str(write_study(tmp_path, **change)))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "study").exists()


def test_the_dev_split_is_seeded_and_disjoint_from_training_rows():
    sst2 = [Row({"label": str(i % 2), "sentence": f"s{i}"}, f"f:{i}") for i in range(40)]
    train, dev = split_dev(sst2, "sst2", 0.25, seed=0)
    assert len(dev) == 10 and len(train) == 30 and not {id(r) for r in train} & {id(r) for r in dev}
    assert split_dev(sst2, "sst2", 0.25, seed=0)[1] == dev and split_dev(sst2, "sst2", 0.25, seed=1)[1] != dev
    e2e = [Row({"mr": f"name[{i % 30}]", "ref": f"r{i}"}, f"f:{i}") for i in range(300)]
    train, dev = split_dev(e2e, "e2e", 0.2, seed=0)
    train_mrs, dev_mrs = {r.fields["mr"] for r in train}, {r.fields["mr"] for r in dev}
    assert dev_mrs and train_mrs and not train_mrs & dev_mrs  # by meaning representation, never by row


@pytest.mark.parametrize("select, task", [("e2e/bleu", "e2e"), ("gsm8k/exact_match", "gsm8k"),
                                          ("alpaca-heldout/loss", "alpaca-heldout"), ("sst2/accuracy", "sst2")])
def test_no_dev_row_is_a_row_its_eval_task_scores(tmp_path, select, task):
    """The pipeline's dev split against each eval task's own reading of its data (for e2e, gsm8k and
    alpaca-heldout the eval rows come out of the training file itself)."""
    from peftkit.evaluation.runner import prepare_specs
    from peftkit.evaluation.tasks import TASKS
    from peftkit.train import build_datasets, data_sources

    module = TASKS[task]  # the task's own readers and splits, not the training pipeline's
    recipe = load_recipe(str(write_study(tmp_path, data={"train": module.TRAIN_FORMAT, "max_length": 1024,
                                                         "limit": 4000}, tune={}, seeds=[], methods={},
                                         eval={"tasks": [task]}, selection={"metric": select})))
    _, tokenizer = peftkit.load_model("tiny-llama")
    _, _, dev = build_datasets(recipe, tokenizer, data_sources(recipe))
    (spec,) = prepare_specs([task])
    if task == "e2e":
        _, held = module.split_e2e(module.read_e2e(Path(spec.data)), spec.heldout_fraction, spec.split_seed)
        ours, theirs = {r.fields["mr"] for r in dev}, {r["mr"] for r in held}
    elif task == "gsm8k":
        rows = module.read_gsm8k(Path(spec.data))
        ours = {r.fields["question"] for r in dev}
        theirs = {rows[i]["question"] for i in module.eval_slice(len(rows), spec.eval_size, spec.split_seed)[0]}
    elif task == "alpaca-heldout":
        records = module.read_alpaca(Path(spec.data))
        ours = {(r.fields["instruction"], r.fields.get("input") or "", r.fields["output"]) for r in dev}
        held = module.split_heldout(len(records), spec.heldout_fraction, spec.split_seed)[1]
        theirs = {(records[i]["instruction"], records[i]["input"], records[i]["output"]) for i in held}
    else:
        ours = {r.fields["sentence"] for r in dev}
        theirs = {text for text, _ in module.read_sst2(Path(spec.data))}
    assert len(dev) > 10 and theirs and not ours & theirs


def test_choose_breaks_ties_by_grid_order_and_knows_lower_is_better():
    assert choose([50.0, 75.0, 75.0], "sst2/accuracy") == 1
    assert choose([2.1, 1.9, 1.9], "alpaca-heldout/loss") == 1
    assert choose([float("nan"), None, 40.0], "sst2/accuracy") == 2 and choose([None], "sst2/accuracy") is None
    assert steps_at(10, 3) == [3, 7, 10] and steps_at(2, 3) == [1, 2]


def test_a_diverged_trial_loses_and_a_method_whose_trials_all_diverged_stops_the_study(tmp_path):
    recipe = load_recipe(str(write_study(tmp_path, methods={
        "lora": {}, "vera": {"adapter": "vera", "tune": {"grid": {"train.lr": [1e-3, 1e-2, 1e-1]}}}})))
    trials = check_tune(recipe)
    split = {"source_format": "sst2", "fraction": 0.25, "seed": 0, "size": 6}
    for (_, run), outcome in zip(trials["lora"] + trials["vera"], [60.0, "diverged", float("nan")] + ["diverged"] * 3):
        out = Path(run.output)
        out.mkdir(parents=True)
        if outcome == "diverged":
            (out / DIVERGED).write_text("{}")
        else:
            (out / "selection.json").write_text(json.dumps({"metric": "sst2/accuracy", "split": split, "points": [
                {"step": 3, "value": outcome, "scores": {}}]}))
    with pytest.raises(ConfigError, match="^tune: every trial of vera diverged .*: lower its grid's learning rates"):
        tuning_record(recipe, trials)
    record = tuning_record(recipe, {"lora": trials["lora"]})
    rows = record["methods"]["lora"]["trials"]
    assert record["methods"]["lora"]["chosen"] == {"train.lr": 1e-3}
    assert [r.get("diverged", False) for r in rows] == [False, True, False] and rows[2]["score"] is None


def _record(values: list[list[int]]) -> dict:
    return {"metric": "sst2/accuracy",
            "points": [{"step": 10 * (i + 1), "value": 0.0, "scores": {"correct": v}} for i, v in enumerate(values)]}


def test_still_rising_compares_the_end_with_two_thirds_of_the_way_paired():
    flat = [0, 1] * 50
    up = [1] * 100
    assert still_rising([_record([flat, flat, up]), _record([flat, flat, up])]) is True
    assert still_rising([_record([flat, up, up]), _record([flat, up, up])]) is False
    assert still_rising([_record([up])]) is None  # one point: nothing to compare


def flipped_root(tmp_path: Path) -> Path:
    """A data root whose training files are the real ones and whose SST-2 eval file has every label flipped."""
    real = resolve_source("sst2")[0].parent.parent
    root = tmp_path / "flipped"
    (root / "sst2").mkdir(parents=True)
    os.symlink(real / "sst2" / "train.tsv", root / "sst2" / "train.tsv")
    lines = (real / "sst2" / "dev.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    column = header.index("label")
    flipped = []
    for line in lines[1:]:
        fields = line.split("\t")
        fields[column] = str(1 - int(fields[column]))
        flipped.append("\t".join(fields))
    (root / "sst2" / "dev.tsv").write_text("\n".join([lines[0], *flipped]) + "\n")
    return root


def test_study_smoke_protocol_and_eval_data_cannot_change_the_choice(tmp_path, monkeypatch):
    import peftkit
    from peftkit.evaluation import evaluate_model

    recipe = load_recipe("study-smoke", [f"output={tmp_path / 'a'}"])
    report = train_methods(recipe, source="study-smoke")
    study = tmp_path / "a"
    tuning = json.loads((study / "tune" / "tuning.json").read_text())
    assert tuning["split"]["size"] == 12 and tuning["trials_per_method"] == 2
    for name, found in tuning["methods"].items():
        scores = [t["score"] for t in found["trials"]]
        assert found["chosen"] == found["trials"][choose(scores, "sst2/accuracy")]["values"]
        for seed in (1, 2):
            final = yaml.safe_load((study / f"{name}-seed{seed}" / "recipe.yaml").read_text())
            assert final["train"]["lr"] == found["chosen"]["train.lr"] and final["train"]["seed"] == seed
        for trial in found["trials"]:
            assert not (study / trial["run"] / "eval.json").exists()  # trials never score the eval data
    result = json.loads((report / "report.json").read_text())
    assert result["selection"] == {"split": {"source_format": "sst2", "fraction": 0.25, "seed": 0}, "size": 12,
                                   "metric": "sst2/accuracy", "search": tuning["search"], "trials_per_method": 2}
    rows = {m["name"]: m for m in result["methods"]}
    assert list(rows) == ["lora", "full"] and rows["full"]["method"] == "full"
    system = json.loads((study / "full-seed1" / "system.json").read_text())
    assert rows["full"]["trainable"] == system["total_parameters"] > 20 * rows["lora"]["trainable"]  # all of them
    assert {m["seeds"] == [1, 2] and isinstance(m["converged"], bool) for m in rows.values()} == {True}
    assert rows["full"]["tuning"]["grid"] == {"train.lr": [1e-4, 1e-3]} and "full" in rows["lora"]["p_beats"]
    markdown = (report / "report.md").read_text()
    assert "## Tuning" in markdown and "converged" in markdown.split("## Verdict")[1].split("## Ranks")[0].lower()

    # the same study on data whose eval file has every label flipped: the same trials, scores and choices
    monkeypatch.setenv("PEFTKIT_DATA", str(flipped_root(tmp_path)))
    other = load_recipe("study-smoke", [f"output={tmp_path / 'b'}"])
    (tmp_path / "b").mkdir()
    assert tune_methods(other, source="study-smoke", resume=False)["methods"] == tuning["methods"]
    # ... while the final runs read it: the same model scores 100 - its accuracy there
    model, tokenizer = peftkit.load_model("tiny-llama")
    peftkit.load_adapter(model, study / "lora-seed1" / "adapter")
    flipped = evaluate_model(model, tokenizer, ["sst2"], limit=16, use_cache=False, progress=False)
    accuracy = json.loads((study / "lora-seed1" / "eval.json").read_text())["tasks"]["sst2"]["metrics"]["accuracy"]
    assert flipped["tasks"]["sst2"]["metrics"]["accuracy"] == pytest.approx(100 - accuracy)

    # an interrupted study keeps the trials that finished
    monkeypatch.delenv("PEFTKIT_DATA")
    kept = (study / "tune" / "lora" / "trial-1" / "system.json").stat().st_mtime_ns
    (study / "tune" / "lora" / "trial-2" / "system.json").unlink()
    shutil.rmtree(study / "report")
    train_methods(recipe, resume=True)
    assert (study / "tune" / "lora" / "trial-1" / "system.json").stat().st_mtime_ns == kept
    assert json.loads((study / "tune" / "tuning.json").read_text()) == tuning
