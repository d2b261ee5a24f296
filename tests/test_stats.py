"""Intervals from per-example statistics: each task's stored statistics recompute its metric
exactly (BLEU and chrF as sacrebleu's corpus scores), the bootstrap matches the binomial
interval it should, and paired differences find real effects and only those."""

import math

import numpy as np
import pytest

import peftkit
from peftkit import stats
from peftkit.evaluation import evaluate_model
from peftkit.evaluation.metrics import compute


def test_corpus_scores_from_sentence_statistics():
    predictions = ["the cat sat on the mat", "a dog barked loudly", "nothing matches here at all", "the red car"]
    references = [["the cat sat on the mat", "a cat was on the mat"], ["the dog barked"], ["something else"],
                  ["a red car", "the red car"]]
    scores = {"bleu_stats": stats.bleu_statistics(predictions, references),
              "chrf_stats": stats.chrf_statistics(predictions, references)}
    assert stats.metric_value("bleu", scores) == pytest.approx(compute("bleu", predictions, references)["score"], abs=1e-9)
    assert stats.metric_value("chrf", scores) == pytest.approx(compute("chrf", predictions, references)["score"], abs=1e-9)


def test_task_scores_recompute_their_metrics():
    model, tokenizer = peftkit.load_model("tiny-llama", dtype="fp32", device="cpu")
    report = evaluate_model(model, tokenizer, ["sst2", "e2e", "alpaca-heldout"], limit=12, use_cache=False,
                            generation={"max_new_tokens": 8}, progress=False)
    for task, result in report["tasks"].items():
        for metric, value in result["metrics"].items():
            if stats.supports(metric, result["scores"]):
                assert stats.metric_value(metric, result["scores"]) == pytest.approx(value, rel=1e-6, abs=1e-9), (
                    task, metric)
    assert len(report["tasks"]["sst2"]["scores"]["correct"]) == 12
    assert len(report["tasks"]["alpaca-heldout"]["scores"]["nll"]) == 12
    assert stats.supports("bleu", report["tasks"]["e2e"]["scores"])
    answers = report["tasks"]["alpaca-heldout"]["examples"]  # a few held-out instructions answered, for a look
    assert len(answers) == 3 and all(a["instruction"] and isinstance(a["output"], str) for a in answers)


def test_bootstrap_interval_matches_the_binomial():
    correct = [1] * 784 + [0] * 88  # 90 % of SST-2 dev's 872
    found = stats.interval("accuracy", [{"correct": correct}])
    half = 1.96 * math.sqrt(0.9 * 0.1 / 872) * 100  # Wald: +-2.0 points
    assert found.value == pytest.approx(89.908, abs=1e-3)
    assert found.low == pytest.approx(found.value - half, abs=0.4) and found.high == pytest.approx(found.value + half, abs=0.4)


def test_seeds_widen_the_interval_and_give_a_spread():
    rng = np.random.default_rng(0)
    one = {"correct": list((rng.random(400) < 0.8).astype(int))}
    far = {"correct": list((rng.random(400) < 0.6).astype(int))}
    single, both = stats.interval("accuracy", [one]), stats.interval("accuracy", [one, far])
    assert both.seeds == 2 and both.spread > 5 and single.spread == 0
    assert both.high - both.low > single.high - single.low


def test_paired_difference_is_significant_only_for_a_real_effect():
    rng = np.random.default_rng(1)
    base = (rng.random(872) < 0.8).astype(int)
    noisy = base.copy()
    flip = rng.choice(872, 10, replace=False)  # 10 examples change, half each way: no effect
    noisy[flip[:5]], noisy[flip[5:]] = 1 - noisy[flip[:5]], 1 - noisy[flip[5:]]
    better = np.where(rng.random(872) < 0.5, 1, base)  # half of the errors fixed: +10 points
    same = stats.difference("accuracy", [{"correct": list(noisy)}], [{"correct": list(base)}])
    real = stats.difference("accuracy", [{"correct": list(better)}], [{"correct": list(base)}])
    assert same.contains(0.0) and not real.contains(0.0) and real.low > 5
    with pytest.raises(ValueError, match="different examples"):
        stats.difference("accuracy", [{"correct": [1, 0]}], [{"correct": [1, 0, 1]}])


def test_probability_of_beating_follows_the_resampling_math():
    """A method right on one more of n examples than another, and the same elsewhere, beats it in
    every draw that picks that example and ties in the others: P = 1 - (1 - 1/n)^n / 2."""
    n = 100
    reference = [1] * 60 + [0] * 40
    ahead = reference[:]
    ahead[-1] = 1
    matrix = stats.bootstrap_matrix("accuracy", [[{"correct": ahead}], [{"correct": reference}]])
    expected = 1 - 0.5 * (1 - 1 / n) ** n  # 0.817
    assert stats.probability_better(matrix, "accuracy", 0, 1) == pytest.approx(expected, abs=0.03)
    assert stats.probability_better(matrix, "accuracy", 1, 0) == pytest.approx(1 - expected, abs=0.03)
    assert stats.probability_better(matrix, "accuracy", 0, 0) == 0.5


def test_rank_intervals_separate_only_what_the_data_separates():
    rng = np.random.default_rng(2)
    scores = [[{"correct": list((rng.random(872) < p).astype(int))}] for p in (0.9, 0.6, 0.6)]
    matrix = stats.bootstrap_matrix("accuracy", scores)
    assert stats.rank_interval(matrix, "accuracy") == [(1, 1), (2, 3), (2, 3)]
    losses = [[{"nll": [2.0] * 50, "tokens": [1] * 50}], [{"nll": [3.0] * 50, "tokens": [1] * 50}]]
    assert stats.rank_interval(stats.bootstrap_matrix("loss", losses), "loss") == [(1, 1), (2, 2)]  # lower is better
    tied = stats.bootstrap_matrix("accuracy", [scores[0], scores[0]])
    assert stats.rank_interval(tied, "accuracy") == [(1, 1), (1, 1)]  # a tie shares the better rank
    with pytest.raises(ValueError, match="different examples"):
        stats.bootstrap_matrix("accuracy", [[{"correct": [1, 0]}], [{"correct": [1, 0, 1]}]])


def test_paired_seeds_draw_the_same_seeds_for_every_column():
    """Two columns holding the same runs (a run's dev metric at two points where nothing changed):
    paired, every draw gives both the same value; unpaired, the seed draws differ between them."""
    rng = np.random.default_rng(3)
    seeds = [{"correct": list((rng.random(200) < p).astype(int))} for p in (0.5, 0.7, 0.9)]
    paired = stats.bootstrap_matrix("accuracy", [seeds, seeds], resamples=200, paired_seeds=True)
    assert np.array_equal(paired[:, 0], paired[:, 1])
    unpaired = stats.bootstrap_matrix("accuracy", [seeds, seeds], resamples=200)
    assert not np.array_equal(unpaired[:, 0], unpaired[:, 1])
    with pytest.raises(ValueError, match="paired seeds need as many seeds"):
        stats.bootstrap_matrix("accuracy", [seeds, seeds[:2]], paired_seeds=True)
