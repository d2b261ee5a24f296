"""Confidence intervals for eval metrics: a bootstrap over examples, and over seeds where a
method was trained with several.

Each eval task stores per-example statistics (`scores` in eval.json): what its metric is
computed from, so a resample of the examples recomputes the metric exactly as the task does.
Corpus metrics resample sufficient statistics: BLEU's and chrF's n-gram counts per sentence
(sacrebleu's own paired bootstrap does the same), a loss its summed nats and tokens.

With several seeds, each bootstrap draw picks seeds with replacement, then examples with
replacement (the same example indices for every seed and method: the comparison is paired),
and averages the metric over the picked seeds. A difference to a reference method is
significant when its 95 % interval excludes zero.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 1000
LEVEL = 0.95


def bleu_statistics(predictions: Sequence[str], references: Sequence[Sequence[str]],
                    tokenize: str = "13a") -> list[list[int]]:
    """sacrebleu's per-sentence BLEU statistics (n-gram matches and totals, lengths)."""
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize)._extract_corpus_statistics(list(predictions), _streams(references))


def chrf_statistics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[float]]:
    from sacrebleu.metrics import CHRF

    return CHRF()._extract_corpus_statistics(list(predictions), _streams(references))


def _streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    width = max((len(refs) for refs in references), default=0)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def _bleu(stats: np.ndarray) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU()._compute_score_from_stats([int(v) for v in stats.sum(axis=0)]).score


def _chrf(stats: np.ndarray) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF()._compute_score_from_stats(list(stats.sum(axis=0))).score


def _macro_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
    scores = []
    for label in np.unique(labels):
        tp = np.sum((predicted == label) & (labels == label))
        fp, fn = np.sum((predicted == label) & (labels != label)), np.sum((predicted != label) & (labels == label))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return 100 * float(np.mean(scores))


# metric name -> (the per-example statistics it needs, the metric of a resample of them)
METRICS: dict[str, tuple[tuple[str, ...], Callable[..., float]]] = {
    "accuracy": (("correct",), lambda correct: 100 * float(np.mean(correct))),
    "exact_match": (("correct",), lambda correct: 100 * float(np.mean(correct))),
    "f1_macro": (("prediction", "label"), _macro_f1),
    "loss": (("nll", "tokens"), lambda nll, tokens: float(np.sum(nll) / np.sum(tokens))),
    "perplexity": (("nll", "tokens"), lambda nll, tokens: math.exp(float(np.sum(nll) / np.sum(tokens)))),
    "bleu": (("bleu_stats",), _bleu),
    "chrf": (("chrf_stats",), _chrf),
    "rougeL": (("rougeL",), lambda values: 100 * float(np.mean(values))),
}


def metric_value(metric: str, scores: dict[str, list], index: np.ndarray | None = None) -> float:
    """The metric on the examples at `index` (all of them when None)."""
    names, function = METRICS[metric]
    columns = [np.asarray(scores[name]) for name in names]
    if index is not None:
        columns = [column[index] for column in columns]
    return function(*columns)


def supports(metric: str, scores: dict[str, list] | None) -> bool:
    return bool(scores) and metric in METRICS and all(name in scores for name in METRICS[metric][0])


@dataclass
class Interval:
    """A point estimate (the mean over seeds of the full-data metric) and its bootstrap interval."""

    value: float
    low: float
    high: float
    seeds: int
    spread: float  # standard deviation over seeds (0 for one)

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


def _draws(n_examples: int, resamples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n_examples, size=(resamples, n_examples))


def interval(metric: str, runs: Sequence[dict[str, list]], resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """95 % interval of `metric` over the examples (and over `runs`, one per seed)."""
    values = [metric_value(metric, scores) for scores in runs]
    n = len(runs[0][METRICS[metric][0][0]])
    draws, seed_rng = _draws(n, resamples, seed), np.random.default_rng(seed + 1)
    samples = []
    for index in draws:
        picked = seed_rng.integers(0, len(runs), size=len(runs)) if len(runs) > 1 else [0]
        samples.append(np.mean([metric_value(metric, runs[i], index) for i in picked]))
    low, high = np.quantile(samples, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Interval(float(np.mean(values)), float(low), float(high), len(runs),
                    float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def difference(metric: str, runs: Sequence[dict[str, list]], reference: Sequence[dict[str, list]],
               resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """95 % interval of metric(runs) - metric(reference), paired over examples (the same draws for
    both), seeds drawn independently per side; significant when it excludes 0."""
    n = len(runs[0][METRICS[metric][0][0]])
    if len(reference[0][METRICS[metric][0][0]]) != n:
        raise ValueError(f"{metric}: the runs scored different examples ({n} vs "
                         f"{len(reference[0][METRICS[metric][0][0]])}): evaluate them on the same set")
    rng = np.random.default_rng(seed + 2)
    samples = []
    for index in _draws(n, resamples, seed):
        ours = [runs[i] for i in (rng.integers(0, len(runs), size=len(runs)) if len(runs) > 1 else [0])]
        theirs = [reference[i] for i in (rng.integers(0, len(reference), size=len(reference))
                                         if len(reference) > 1 else [0])]
        samples.append(np.mean([metric_value(metric, s, index) for s in ours])
                       - np.mean([metric_value(metric, s, index) for s in theirs]))
    value = (np.mean([metric_value(metric, s) for s in runs]) - np.mean([metric_value(metric, s) for s in reference]))
    low, high = np.quantile(samples, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Interval(float(value), float(low), float(high), len(runs), 0.0)


# --- ranks among several methods ---------------------------------------------------------------
LOWER_IS_BETTER = frozenset({"loss", "perplexity"})


def bootstrap_matrix(metric: str, methods: Sequence[Sequence[dict[str, list]]], resamples: int = RESAMPLES,
                     seed: int = 0, paired_seeds: bool = False) -> np.ndarray:
    """Each method's metric in each bootstrap draw, shape (resamples, methods).

    Every draw resamples the examples once for all methods (they scored the same examples: the
    comparison is paired), then each method's seeds with replacement, and averages over them.
    `paired_seeds`: the columns are the same seeds at different points (a run's dev metric early
    and late), so one draw of seed indices serves every column.

    Raises:
        ValueError: the methods (or seeds) scored different numbers of examples, or, with
            `paired_seeds`, hold different numbers of seeds.
    """
    sizes = {len(scores[METRICS[metric][0][0]]) for runs in methods for scores in runs}
    if len(sizes) != 1:
        raise ValueError(f"{metric}: the methods scored different examples ({sorted(sizes)}): evaluate them on one set")
    counts = {len(runs) for runs in methods}
    if paired_seeds and len(counts) != 1:
        raise ValueError(f"{metric}: paired seeds need as many seeds in every column, got {sorted(counts)}")
    rng = np.random.default_rng(seed + 3)
    matrix = np.empty((resamples, len(methods)))
    for row, index in enumerate(_draws(sizes.pop(), resamples, seed)):
        shared = _seed_draw(rng, len(methods[0])) if paired_seeds else None
        for column, runs in enumerate(methods):
            picked = shared if paired_seeds else _seed_draw(rng, len(runs))
            matrix[row, column] = np.mean([metric_value(metric, runs[i], index) for i in picked])
    return matrix


def _seed_draw(rng: np.random.Generator, seeds: int) -> list[int]:
    """Seed indices drawn with replacement (one seed: itself, drawing nothing)."""
    return list(rng.integers(0, seeds, size=seeds)) if seeds > 1 else [0]


def ranks(matrix: np.ndarray, metric: str) -> np.ndarray:
    """Each method's rank in each draw (1 = best; tied methods share the better rank), as `matrix`."""
    better = -matrix if metric in LOWER_IS_BETTER else matrix  # higher is better from here on
    return 1 + (better[:, None, :] > better[:, :, None]).sum(axis=2)


def rank_interval(matrix: np.ndarray, metric: str) -> list[tuple[int, int]]:
    """Per method, the 2.5 to 97.5 % range of its rank over the draws (whole ranks)."""
    found = ranks(matrix, metric)
    low = np.quantile(found, (1 - LEVEL) / 2, axis=0, method="lower")
    high = np.quantile(found, (1 + LEVEL) / 2, axis=0, method="higher")
    return [(int(a), int(b)) for a, b in zip(low, high)]


def probability_better(matrix: np.ndarray, metric: str, method: int, reference: int) -> float:
    """The share of draws in which `method` beats `reference` on `metric` (a tie counts half)."""
    ours, theirs = matrix[:, method], matrix[:, reference]
    if metric in LOWER_IS_BETTER:
        ours, theirs = -ours, -theirs
    return float(np.mean(ours > theirs) + 0.5 * np.mean(ours == theirs))
