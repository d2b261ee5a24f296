"""Evaluation end to end: tiny-llama through every task, eval.json and the table, caching,
sampling, shared-prefix scoring, run directories and the CLI; a few slow checks on smollm2."""

import json
from pathlib import Path

import pytest
import torch

import peftkit
from peftkit.data import data_root
from peftkit.cli import main
from peftkit.evaluation import evaluate_model, format_table, write_report
from peftkit.evaluation.generation import generate
from peftkit.evaluation.prompts import chat_example, messages, pad_id, prompt_ids
from peftkit.evaluation.scoring import completion_loss, score_candidates
from peftkit.evaluation.spec import GenerationSettings
from peftkit.evaluation.tasks.alpaca import alpaca_chat
from tests.conftest import randomize_adapter

DATA = data_root()
pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs the data sets (../shared/data or $PEFTKIT_DATA)")
TASKS = "sst2,e2e,gsm8k,alpaca-heldout"
QUICK = {"max_new_tokens": 4}


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Eval results go to a temporary folder; the model cache stays where it is."""
    monkeypatch.setattr("peftkit.evaluation.cache.default_cache_dir", lambda: tmp_path / "eval-cache")
    monkeypatch.delenv("PEFTKIT_DATA", raising=False)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a small shared CPU, OpenMP's second thread waits on busy cores (measured
    8 ms instead of 0.03 ms for a tiny-llama linear layer, and 2.4x slower smollm2 forward passes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_all_tasks_end_to_end_report_shape(tiny):
    model, tokenizer = tiny
    report = evaluate_model(model, tokenizer, TASKS, limit=2, generation=QUICK, progress=False)
    assert set(report) == {"model", "adapter", "tasks", "seconds", "created", "peftkit_version"}
    assert report["model"]["name"] == "tiny-llama" and report["adapter"] is None
    assert list(report["tasks"]) == TASKS.split(",")
    expected = {"sst2": {"accuracy", "f1_macro"}, "e2e": {"bleu", "rougeL", "chrf"},
                "gsm8k": {"exact_match", "answer_found"}, "alpaca-heldout": {"loss", "perplexity"}}
    for name, task in report["tasks"].items():
        assert set(task) == {"metrics", "n", "seconds", "cached", "settings", "details", "examples", "scores"}
        assert set(task["metrics"]) == expected[name] and task["n"] == 2 and task["cached"] is False
        assert task["settings"]["limit"] == 2 and Path(task["settings"]["data"]).is_absolute()
    assert report["tasks"]["e2e"]["details"]["bleu"]["tokenize"] == "13a"
    assert report["tasks"]["e2e"]["settings"]["generation"]["max_new_tokens"] == 4
    assert report["tasks"]["alpaca-heldout"]["metrics"]["loss"] > 0
    json.dumps(report, allow_nan=False)  # strict JSON
    table = format_table(report).splitlines()
    assert table[0].split() == ["task", "shots", "n", "metrics", "seconds"]
    assert [line.split()[0] for line in table[1:]] == TASKS.split(",")


def test_k_shot_prompts_hold_prior_turns(tiny):
    model, tokenizer = tiny
    report = evaluate_model(model, tokenizer, "sst2,gsm8k,e2e", shots=1, limit=1, generation=QUICK, progress=False)
    assert all(t["settings"]["shots"] == 1 for t in report["tasks"].values())
    assert report["tasks"]["sst2"]["details"]["shot_selection"].startswith("balanced")
    assert report["tasks"]["gsm8k"]["details"]["prompting"] == "1-shot chain of thought"


def test_cache_hit_skips_work_and_adapter_changes_the_key(tiny, monkeypatch):
    model, tokenizer = tiny
    first = evaluate_model(model, tokenizer, "sst2", limit=2, progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("a cached task ran again")

    monkeypatch.setattr("peftkit.evaluation.runner.run_task", fail)
    second = evaluate_model(model, tokenizer, "sst2", limit=2, progress=False)
    assert second["tasks"]["sst2"]["cached"] is True
    assert second["tasks"]["sst2"]["metrics"] == first["tasks"]["sst2"]["metrics"]
    for changed in ({"limit": 3}, {"shots": 2}, {"batch_size": 1}):  # other settings: a miss
        with pytest.raises(AssertionError, match="ran again"):
            evaluate_model(model, tokenizer, "sst2", **{"limit": 2, **changed}, progress=False)
    peftkit.apply_adapter(model, "lora")
    randomize_adapter(model)
    with pytest.raises(AssertionError, match="ran again"):
        evaluate_model(model, tokenizer, "sst2", limit=2, progress=False)


def test_seeded_sampling_is_reproducible(tiny):
    model, tokenizer = tiny
    prompts = [prompt_ids(tokenizer, messages([], "Tell me a story " * n)) for n in (1, 3, 2)]
    settings = GenerationSettings(greedy=False, temperature=1.0, top_k=50, top_p=0.95, max_new_tokens=12, seed=7)
    rng_before = torch.random.get_rng_state()
    first = generate(model, tokenizer, prompts, settings, batch_size=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    torch.manual_seed(123)  # whatever ran before does not matter
    assert generate(model, tokenizer, prompts, settings, batch_size=2, progress=False) == first
    other = GenerationSettings(greedy=False, max_new_tokens=12, seed=8)
    assert generate(model, tokenizer, prompts, other, batch_size=2, progress=False) != first
    assert all(first)


@pytest.mark.parametrize("adapter", [{}, {"quantize": "nf4", "target_modules": "all-linear"}, {"dora": True}],
                         ids=["lora", "qlora", "dora"])
def test_generation_runs_merged_and_restores_weights_exactly(tiny, adapter):
    """A LoRA-family adapter generates through merged weights: the same text as unmerged, and
    afterwards the same layers, flags and bits as before."""
    model, tokenizer = tiny
    peftkit.apply_adapter(model, "lora", r=4, alpha=8, **adapter)
    randomize_adapter(model, std=0.3)
    prompts = [prompt_ids(tokenizer, messages([], "Describe the restaurant " * n)) for n in (1, 3, 2)]
    settings = GenerationSettings(max_new_tokens=10)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    layers = [type(m.base) for m in model.modules() if isinstance(m, peftkit.LoRALinear)]
    merged = []
    original_generate = model.generate
    model.generate = lambda **kw: merged.append(all(m.merged for m in model.modules()
                                                    if isinstance(m, peftkit.LoRALinear))) or original_generate(**kw)
    texts = generate(model, tokenizer, prompts, settings, batch_size=2, progress=False)
    assert merged and all(merged)  # it did generate through merged weights
    assert texts == generate(model, tokenizer, prompts, settings, batch_size=2, progress=False, merge=False)
    assert not any(m.merged for m in model.modules() if isinstance(m, peftkit.LoRALinear))
    assert [type(m.base) for m in model.modules() if isinstance(m, peftkit.LoRALinear)] == layers
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_sampling_settings_reach_eval_json(tiny):
    model, tokenizer = tiny
    gen = {"greedy": False, "temperature": 0.7, "top_k": 20, "seed": 3, "max_new_tokens": 4}
    report = evaluate_model(model, tokenizer, "e2e", limit=2, generation=gen, progress=False)
    assert report["tasks"]["e2e"]["settings"]["generation"] == {**gen, "top_p": None}


@pytest.mark.parametrize("candidates", [[[5], [7]], [[5, 6, 7], [8]]])
def test_shared_prefix_scoring_equals_full_forward(tiny, candidates):
    model, tokenizer = tiny
    turns = [("An example", "positive")]
    prompts = [prompt_ids(tokenizer, messages(turns, "Review: " + "x" * n)) for n in (3, 9, 1, 5, 12)]
    shared = score_candidates(model, prompts, candidates, pad_id(tokenizer), batch_size=2, progress=False)
    full = score_candidates(model, prompts, candidates, pad_id(tokenizer), batch_size=3, progress=False,
                            share_prefix=False)
    one_by_one = torch.stack([score_candidates(model, [p], candidates, pad_id(tokenizer), share_prefix=False,
                                               progress=False)[0] for p in prompts])
    torch.testing.assert_close(shared, full, atol=1e-4, rtol=0)
    torch.testing.assert_close(full, one_by_one, atol=1e-4, rtol=0)  # left padding changes nothing


def test_completion_loss_batched_equals_single(tiny):
    model, tokenizer = tiny
    records = [{"instruction": "Repeat " * n, "input": "x" * n, "output": "y" * (n + 1)} for n in (1, 4, 2)]
    examples = [chat_example(tokenizer, alpaca_chat(r)) for r in records]
    total, count = completion_loss(model, examples, pad_id(tokenizer), batch_size=3, progress=False)
    singles = [completion_loss(model, [e], pad_id(tokenizer), share_prefix=False, progress=False) for e in examples]
    assert count == sum(c for _, c in singles) == sum(r["output"].count("y") + 1 for r in records)
    assert total == pytest.approx(sum(t for t, _ in singles), rel=1e-5)


def test_user_file_of_the_same_format(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "my_dev.tsv"
    path.write_text("label\tsentence\n1\ta joy\n0\ta bore\n1\tlovely\n")
    report = evaluate_model(model, tokenizer, "sst2", data_dir=path, progress=False)
    assert report["tasks"]["sst2"]["n"] == 3 and report["tasks"]["sst2"]["settings"]["data"] == str(path)


def make_run(tmp_path: Path, tasks: str = "[sst2]") -> Path:
    model, _ = peftkit.load_model("tiny-llama")
    peftkit.apply_adapter(model, "lora")
    randomize_adapter(model)
    run = tmp_path / "runs" / "tiny-lora"
    peftkit.save_adapter(model, run / "adapter")
    (run / "recipe.yaml").write_text(f"model: tiny-llama\nadapter: lora\neval: {{tasks: {tasks}}}\n")
    return run


def test_cli_run_directory_writes_and_merges_eval_json(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["eval", str(run), "--limit", "2"]) == 0  # tasks from the recipe
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["task", "shots"] and f"eval: {run / 'eval.json'}" in out
    report = json.loads((run / "eval.json").read_text())
    assert report["adapter"]["method"] == "lora" and len(report["adapter"]["sha256"]) == 64
    assert report["adapter"]["path"] == str(run / "adapter") and report["model"]["source"] == str(run)
    assert main(["eval", str(run), "--tasks", "alpaca-heldout", "--limit", "2"]) == 0
    merged = json.loads((run / "eval.json").read_text())
    assert list(merged["tasks"]) == ["sst2", "alpaca-heldout"]  # the earlier task is kept


def test_cli_run_directory_takes_the_recipes_shots_and_limit(tmp_path, capsys):
    run = make_run(tmp_path)
    (run / "recipe.yaml").write_text("model: tiny-llama\nadapter: lora\neval: {tasks: [sst2], shots: 2, limit: 3}\n")
    assert main(["eval", str(run)]) == 0
    task = json.loads((run / "eval.json").read_text())["tasks"]["sst2"]
    assert task["n"] == 3 and task["settings"]["shots"] == 2 and task["settings"]["limit"] == 3
    assert main(["eval", str(run), "--limit", "2", "--shots", "0"]) == 0  # the command line wins
    task = json.loads((run / "eval.json").read_text())["tasks"]["sst2"]
    assert task["n"] == 2 and task["settings"]["shots"] == 0


def test_cli_model_with_adapter_and_out(tmp_path, capsys):
    run = make_run(tmp_path)
    out = tmp_path / "elsewhere" / "eval.json"
    assert main(["eval", "tiny-llama", "--adapter", str(run / "adapter"), "--tasks", "e2e", "--limit", "2",
                 "--max-new-tokens", "3", "--sample", "--seed", "5", "--out", str(out)]) == 0
    settings = json.loads(out.read_text())["tasks"]["e2e"]["settings"]["generation"]
    assert settings["greedy"] is False and settings["seed"] == 5 and settings["max_new_tokens"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "sst2", "--temperature", "0.5"], "add --sample"),
    (["--tasks", "sst3"], "did you mean 'sst2'"),
    (["--tasks", "sst2", "--limit", "0"], "limit must be a positive integer"),
    ([], "no eval tasks: pass --tasks"),
])
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(["eval", "tiny-llama", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftkit: error:") and message in err and "\n" not in err


def test_cli_run_with_adapter_flag_is_rejected(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["eval", str(run), "--adapter", str(run / "adapter")]) == 1
    assert "drop --adapter" in capsys.readouterr().err


def test_write_report_replaces_another_models_results(tmp_path):
    path = tmp_path / "eval.json"
    write_report({"model": {"name": "a"}, "adapter": None, "tasks": {"x": {}}}, path)
    write_report({"model": {"name": "b"}, "adapter": None, "tasks": {"y": {}}}, path)
    assert list(json.loads(path.read_text())["tasks"]) == ["y"]


@pytest.mark.slow
def test_smollm2_sst2_and_alpaca_beat_chance(smol):
    model, tokenizer = smol
    report = evaluate_model(model, tokenizer, "sst2,alpaca-heldout", limit=16, use_cache=False, progress=False)
    assert report["tasks"]["sst2"]["metrics"]["accuracy"] > 55  # 50 is chance; see eval/README.md for full runs
    assert report["tasks"]["alpaca-heldout"]["metrics"]["perplexity"] < 20


@pytest.mark.slow
def test_smollm2_batched_generation_equals_one_by_one(smol):
    model, tokenizer = smol
    mrs = ["name[The Eagle], food[French]", "name[Alimentum], area[city centre], familyFriendly[no]"]
    prompts = [prompt_ids(tokenizer, messages([], f"Describe this restaurant: {mr}")) for mr in mrs]
    settings = GenerationSettings(max_new_tokens=10)
    batched = generate(model, tokenizer, prompts, settings, batch_size=2, progress=False)
    assert batched == [generate(model, tokenizer, [p], settings, progress=False)[0] for p in prompts]
    assert all(len(text.split()) >= 3 for text in batched)


def test_peft_prefix_generation_is_skipped_because_peft_drops_the_prefix(tiny):
    """peft 0.21's prefix-tuning generate() ignores the prefix under transformers 5; the day it stops
    doing so, the first assertion fails and the skip in `refuse_peft_prefix` should go."""
    from peft import PrefixTuningConfig, get_peft_model

    model, tokenizer = tiny
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    base = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    wrapped = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:
                param.mul_(5)  # a prefix loud enough to change the next token
        prefixed_next = wrapped(input_ids=ids).logits[0, -1].argmax().item()
    generated = wrapped.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert prefixed_next != base[0, 5].item()  # the prefix changes the next token in a forward pass...
    assert torch.equal(generated, base)  # ...but generate() returns the base model's tokens
    report = evaluate_model(wrapped, tokenizer, "e2e,alpaca-heldout", limit=2, generation=QUICK, progress=False)
    assert report["tasks"]["e2e"]["metrics"] == {} and "drops prefix-tuning" in report["tasks"]["e2e"]["skipped"]
    assert report["tasks"]["alpaca-heldout"]["metrics"]["loss"] > 0  # scoring tasks still run
    assert "skipped: peft's generate()" in format_table(report)
