"""Runs of one method grouped (one per seed), and their statistics: intervals, differences to a
reference, forgetting, and bootstrap ranks among the methods (`peftkit.stats`). Each result is
computed once per group and kept (`Group.cached`): every table, plot and report.json reads it."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from peftkit import stats
from peftkit.run_summary import RunSummary

FORGETTING_TASK = "alpaca-heldout"
MAIN_METRICS = ("sst2/accuracy", "e2e/bleu", "gsm8k/exact_match", "e2e/rougeL")  # the verdict's, first found


@dataclass
class Group:
    """The runs of one method (one per seed)."""

    name: str
    runs: list[RunSummary]
    index: int  # colour
    cache: dict = field(default_factory=dict)  # bootstrap results: each table and plot reads them again
    tuning: dict | None = None  # its entry in a study's tuning.json: grid, trials, chosen (peftkit.tune)

    def cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    @property
    def first(self) -> RunSummary:
        return self.runs[0]

    def mean(self, attribute: str) -> float:
        """The mean of a run attribute over the seeds that have it (NaN where none does)."""
        values = [getattr(r, attribute) for r in self.runs]
        values = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        return float(np.mean(values)) if values else float("nan")

    def scores(self, task: str) -> list[dict[str, list]] | None:
        """Each seed's per-example statistics for `task`; None unless every seed stored them."""
        found = [r.scores.get(task) for r in self.runs]
        return found if all(found) else None

    def trained_on(self, task: str) -> bool:
        sources = (self.first.recipe.get("data") or {}).get("train") or []
        sources = [sources] if isinstance(sources, str) else sources
        return any(task.split("-")[0] in str(source) for source in sources)


def groups_of(runs: list[RunSummary], tuning: dict | None = None) -> list[Group]:
    """One group per method, in the runs' order; runs that differ only in their seed share one.
    `tuning`: a study's tuning.json, whose entries join the groups of the same name."""
    found: dict[str, list[RunSummary]] = {}
    for run in runs:
        found.setdefault(run.group, []).append(run)
    tuned = (tuning or {}).get("methods") or {}
    return [Group(name, members, i, tuning=tuned.get(name)) for i, (name, members) in enumerate(found.items())]


def converged(group: Group) -> bool | None:
    """False where the dev metric still rose over the last third of training (paired over the dev
    examples and seeds: `peftkit.selection.still_rising`); None without a dev split in every run."""
    from peftkit.selection import still_rising

    records = [r.selection for r in group.runs]
    if not all(records):
        return None

    def compute() -> bool | None:
        rising = still_rising(records)
        return None if rising is None else not rising

    return group.cached(("converged",), compute)


def reference_group(groups: list[Group]) -> Group | None:
    """LoRA through peftkit: the group named `lora`, else the first LoRA group."""
    by_name = {g.name: g for g in groups}
    if "lora" in by_name:
        return by_name["lora"]
    return next((g for g in groups if g.first.method == "lora" and g.first.impl == "peftkit"), None)


def interval(group: Group, metric: str) -> stats.Interval | None:
    """The metric's mean over seeds with its 95 % interval (over examples and seeds), or the plain
    mean and spread where the runs stored no per-example statistics."""
    return group.cached(("interval", metric), lambda: _interval(group, metric))


def _interval(group: Group, metric: str) -> stats.Interval | None:
    task, name = metric.split("/", 1)
    scores = group.scores(task)
    if scores and all(stats.supports(name, s) for s in scores):
        return stats.interval(name, scores)
    values = [r.metrics[metric] for r in group.runs if metric in r.metrics]
    if not values:
        return None
    return stats.Interval(float(np.mean(values)), float("nan"), float("nan"), len(values),
                          float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)


def significance(group: Group, reference: Group | None, metric: str) -> stats.Interval | None:
    """The difference to the reference with its paired 95 % interval, where both stored statistics."""
    if reference is None or group is reference:
        return None
    return group.cached(("difference", reference.name, metric), lambda: _significance(group, reference, metric))


def _significance(group: Group, reference: Group, metric: str) -> stats.Interval | None:
    task, name = metric.split("/", 1)
    ours, theirs = group.scores(task), reference.scores(task)
    if not (ours and theirs and all(stats.supports(name, s) for s in ours + theirs)):
        return None
    try:
        return stats.difference(name, ours, theirs)
    except ValueError:  # different example sets
        return None


def forgetting(group: Group, base: dict | None) -> stats.Interval | str | None:
    """The rise of the held-out loss on a source outside the training mix over the base model's
    (peft's benchmark's forgetting), paired over the same examples."""
    return group.cached(("forgetting", id(base)), lambda: _forgetting(group, base))


def _forgetting(group: Group, base: dict | None) -> stats.Interval | str | None:
    base_scores = ((base or {}).get("tasks") or {}).get(FORGETTING_TASK, {}).get("scores")
    ours = group.scores(FORGETTING_TASK)
    if not base_scores or not ours:
        return None
    if group.trained_on(FORGETTING_TASK):
        return "in training mix"
    try:
        return stats.difference("loss", ours, [base_scores])
    except ValueError:
        return None


def metric_names(runs: list[RunSummary]) -> list[str]:
    """Every `task/metric` any run reports, sorted."""
    return sorted({m for r in runs for m in r.metrics})


def bootstrap(groups: list[Group], metric: str) -> tuple[list[Group], np.ndarray] | None:
    """The groups that stored per-example statistics for `metric`, and their paired bootstrap draws
    (`stats.bootstrap_matrix`); None where fewer than two did or they scored different examples."""
    task, name = metric.split("/", 1)
    ranked = [g for g in groups if (s := g.scores(task)) and all(stats.supports(name, x) for x in s)]
    if len(ranked) < 2:
        return None

    def compute() -> np.ndarray | None:
        try:
            return stats.bootstrap_matrix(name, [g.scores(task) for g in ranked])
        except ValueError:  # different example sets
            return None

    matrix = ranked[0].cached(("bootstrap", tuple(g.name for g in ranked), metric), compute)
    return None if matrix is None else (ranked, matrix)


def rank_intervals(groups: list[Group], metric: str) -> dict[str, tuple[int, int]]:
    """Group name -> the 95 % interval of its rank on `metric` among the groups (1 = best)."""
    found = bootstrap(groups, metric)
    if found is None:
        return {}
    ranked, matrix = found
    return dict(zip((g.name for g in ranked), stats.rank_interval(matrix, metric.split("/", 1)[1])))


def probabilities_better(groups: list[Group], metric: str, reference: Group | None) -> dict[str, float]:
    """Group name -> the probability that it beats `reference` on `metric` (paired draws)."""
    found = bootstrap(groups, metric)
    if found is None or reference is None or reference not in found[0]:
        return {}
    ranked, matrix = found
    column = ranked.index(reference)
    return {g.name: stats.probability_better(matrix, metric.split("/", 1)[1], i, column)
            for i, g in enumerate(ranked) if g is not reference}


def references(groups: list[Group]) -> list[Group]:
    """What every method is measured against: LoRA, and full fine-tuning where the runs include it."""
    return [g for g in (reference_group(groups), full_group(groups)) if g is not None]


def full_group(groups: list[Group]) -> Group | None:
    """Full fine-tuning, the papers' reference row, where the runs include it (`full`)."""
    return next((g for g in groups if g.name == "full" or g.first.method == "full"), None)


def main_metric(metrics: list[str]) -> str | None:
    """The metric a verdict is about: the first of MAIN_METRICS found, else the first score, else the first loss."""
    scores = [m for m in metrics if not lower_is_better(m)]
    return next((m for m in MAIN_METRICS if m in metrics), (scores or metrics or [None])[0])


def lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in stats.LOWER_IS_BETTER
