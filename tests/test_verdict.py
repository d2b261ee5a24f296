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


def selection(values: list[list[int]]) -> dict:
    return {"metric": "sst2/accuracy", "points": [{"step": 10 * (i + 1), "value": 100 * float(np.mean(v)),
                                                   "scores": {"correct": v}} for i, v in enumerate(values)]}


def test_convergence_grid_edges_and_tuning_in_the_verdict_and_report():
    flat, up = [0, 1] * 100, [1] * 200
    runs = [run("lora", 0.70, 2.0, 100), run("vera", 0.72, 2.0, 10)]
    runs[0].selection, runs[1].selection = selection([flat, up, up]), selection([flat, flat, up])
    tuning = {"metric": "sst2/accuracy", "split": {"source_format": "sst2", "fraction": 0.1, "seed": 0, "size": 200},
              "search": "grid", "trials_per_method": 3, "methods": {
                  "lora": {"grid": {"train.lr": [1e-4, 1e-3, 1e-2]}, "chosen": {"train.lr": 1e-3},
                           "trials": [{"values": {"train.lr": v}, "score": s} for v, s in ((1e-4, 60), (1e-3, 80),
                                                                                            (1e-2, 70))]},
                  "vera": {"grid": {"train.lr": [1e-3, 1e-2, 1e-1]}, "chosen": {"train.lr": 1e-1},
                           "trials": [{"values": {"train.lr": v}, "score": s,
                                       **({"diverged": True} if s is None else {})}
                                      for v, s in ((1e-3, 50), (1e-2, None), (1e-1, 75))]}}}
    groups = groups_of(runs, tuning)
    lines = verdict(groups)
    assert lines[-2].startswith("Did not converge (the dev metric still rose over the last third") and \
        lines[-2].endswith(": vera.")
    assert lines[-1] == "Chosen at the edge of their grid (the best value may lie beyond it): vera."
    report = json.loads(json.dumps(report_json(groups, runs, tuning), allow_nan=False))
    assert report["selection"]["size"] == 200 and report["selection"]["metric"] == "sst2/accuracy"
    rows = {m["name"]: m for m in report["methods"]}
    assert rows["lora"]["converged"] is True and rows["vera"]["converged"] is False
    assert rows["vera"]["tuning"]["chosen"] == {"train.lr": 1e-1}
    assert rows["vera"]["tuning"]["trials"][1]["score"] is None
    from peftkit.verdict import tuning_rows

    header, table = tuning_rows(groups)
    assert table[1] == ["vera", "train.lr: 0.001, 0.01, 0.1", "50, diverged, 75", "train.lr=0.1 (grid edge)",
                        "no (still rising)"]
