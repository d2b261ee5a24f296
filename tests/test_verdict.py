"""The verdict and report.json from run summaries: who is best on the main metric (a loss ranks
lowest first), methods that cannot be ranked named, Pareto fronts, valid JSON."""

import json

import numpy as np

from peftkit.groups import groups_of
from peftkit.run_summary import RunSummary
from peftkit.verdict import report_json, verdict


def run(name: str, correct: float, nll: float, trainable: int, seed: int = 0, scored: bool = True) -> RunSummary:
    rng = np.random.default_rng(seed)
    scores = {"sst2": {"correct": list((rng.random(400) < correct).astype(int))},
              "alpaca-heldout": {"nll": list(nll + rng.random(200)), "tokens": [1] * 200}} if scored else {}
    return RunSummary(name=name, method=name, impl="peftkit", recipe={"model": "m", "train": {"seed": seed}},
                      metrics={"sst2/accuracy": 100 * correct, "alpaca-heldout/loss": nll + 0.5},
                      trainable=trainable, total=10_000, scores=scores)


def test_the_verdict_reads_the_ranks_and_costs():
    runs = [run("lora", 0.70, 2.0, 100), run("dora", 0.90, 2.5, 300), run("ia3", 0.72, 1.5, 10),
            run("prompt", 0.50, 3.0, 5, scored=False)]
    lines = verdict(groups_of(runs))
    assert lines[0] == ("On sst2/accuracy, dora is the best: it alone has a 95 % rank interval that includes 1. "
                        "Not ranked (no per-example statistics for sst2/accuracy, or other examples): prompt.")
    assert lines[1] == "Pareto front of sst2/accuracy against trainable parameters (means): prompt, ia3, dora."
    only_loss = [RunSummary(**{**vars(r), "metrics": {"alpaca-heldout/loss": r.metrics["alpaca-heldout/loss"]},
                               "scores": {"alpaca-heldout": r.scores["alpaca-heldout"]}}) for r in runs[:3]]
    lines = verdict(groups_of(only_loss))  # a loss: the lowest is best, and the front keeps the lower
    assert lines[0].startswith("On alpaca-heldout/loss, ia3 is the best")
    assert lines[1] == "Pareto front of alpaca-heldout/loss against trainable parameters (means): ia3."


def test_ties_and_missing_numbers():
    same = [run("lora", 0.8, 2.0, 100, seed=1), run("lora-copy", 0.8, 2.0, 100, seed=1)]
    assert verdict(groups_of(same))[0] == ("On sst2/accuracy, lora, lora-copy cannot be told apart as the best: "
                                           "each has a 95 % rank interval that includes 1.")
    report = report_json(groups_of(same + [run("nan", float("nan"), 2.0, 0, scored=False)]), same)
    text = json.dumps(report, allow_nan=False)  # valid JSON: a missing number is null, never NaN
    nan = {m["name"]: m for m in json.loads(text)["methods"]}["nan"]
    assert nan["metrics"]["sst2/accuracy"]["mean"] is None and nan["trainable"] is None and nan["rank"] == {}
