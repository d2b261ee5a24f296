"""What a comparison concludes, computed from its statistics and never written by hand: rank
intervals, the probability of beating LoRA and full fine-tuning, a short verdict, and
`report.json`, the machine-readable report.

The verdict names, on the main metric (`groups.main_metric`), the methods whose 95 % rank
interval includes 1 (none of the others can be told apart from them as the best), and the Pareto
front of that metric against each cost (trainable parameters, peak memory, training time): the
methods no other beats on both.
"""

import math

from peftkit import plots
from peftkit.groups import (Group, full_group, interval, main_metric, metric_names, probabilities_better,
                            rank_intervals, reference_group)
from peftkit.run_summary import RunSummary

COSTS = {"trainable parameters": "trainable", "peak memory": "peak_memory_mb", "training time": "train_time_s"}
CONVERGENCE = ("Convergence is not judged: these runs have no selection split to follow during training "
               "(`tune:` carves one).")


def cost(group: Group, attribute: str) -> float:
    return float(group.first.trainable or "nan") if attribute == "trainable" else group.mean(attribute)


def verdict(groups: list[Group]) -> list[str]:
    """The verdict's sentences (Markdown), from the rank intervals and the costs."""
    metrics = metric_names([r for g in groups for r in g.runs])
    main = main_metric(metrics)
    if main is None:
        return ["No metric to judge: the runs were not evaluated."]
    ranked = rank_intervals(groups, main)
    if ranked:
        best = [name for name, (low, _) in ranked.items() if low == 1]
        lines = [f"On {main}, the methods whose 95 % rank interval includes 1 (none can be told apart as the "
                 f"best): {', '.join(best)}."]
    else:
        lines = [f"On {main}, no ranks: the runs stored no per-example statistics for it."]
    values = [interval(g, main).value if interval(g, main) else float("nan") for g in groups]
    for label, attribute in COSTS.items():
        front = plots.pareto_front([(cost(g, attribute), v) for g, v in zip(groups, values)])
        if front:
            lines.append(f"Pareto front of {main} against {label}: {', '.join(groups[i].name for i in front)}.")
    return lines + [CONVERGENCE]


def rank_rows(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    """Per method, its rank interval on each metric and its probability of beating LoRA (and full
    fine-tuning) on the main metric."""
    metrics = [m for m in metric_names([r for g in groups for r in g.runs]) if not m.endswith("/perplexity")]
    main = main_metric(metrics)
    ranks = {m: rank_intervals(groups, m) for m in metrics}
    references = [r for r in (reference_group(groups), full_group(groups)) if r is not None]
    chances = {r.name: probabilities_better(groups, main, r) for r in references} if main else {}
    header = ["method"] + [f"rank: {m}" for m in metrics] + [f"P(beats {name}) on {main}" for name in chances]
    rows = []
    for g in groups:
        row = [g.name] + [_rank(ranks[m].get(g.name)) for m in metrics]
        row += [f"{chances[name][g.name]:.2f}" if g.name in chances[name] else "-" for name in chances]
        rows.append(row)
    return header, rows


def _rank(found: tuple[int, int] | None) -> str:
    return "-" if found is None else f"[{found[0]}, {found[1]}]"


def report_json(groups: list[Group], runs: list[RunSummary]) -> dict:
    """The report for other tools: model, selection, and per method its seeds, metrics (mean, sd,
    95 % interval), rank intervals, probabilities of beating the references, and costs."""
    metrics = metric_names(runs)
    main = main_metric(metrics)
    ranks = {m: rank_intervals(groups, m) for m in metrics}
    references = [r for r in (reference_group(groups), full_group(groups)) if r is not None]
    chances = {r.name: {m: probabilities_better(groups, m, r) for m in metrics} for r in references}
    models = list(dict.fromkeys(str(r.recipe.get("model")) for r in runs))
    methods = []
    for g in groups:
        found = {m: interval(g, m) for m in metrics}
        methods.append({
            "name": g.name, "method": g.first.method, "impl": g.first.impl, "tuning": None,
            "seeds": [(r.recipe.get("train") or {}).get("seed") for r in g.runs],
            "metrics": {m: {"mean": i.value, "sd": i.spread, "ci": [_number(i.low), _number(i.high)]}
                        for m, i in found.items() if i is not None},
            "rank": {m: list(ranks[m][g.name]) for m in metrics if g.name in ranks[m]},
            "p_beats": {name: {m: p[g.name] for m, p in per_metric.items() if g.name in p}
                        for name, per_metric in chances.items() if name != g.name},
            "trainable": g.first.trainable, "peak_memory_mb": _number(g.mean("peak_memory_mb")),
            "train_seconds": _number(g.mean("train_time_s")), "converged": None,
        })
    return {"model": models[0] if len(models) == 1 else models, "selection": None, "main_metric": main,
            "verdict": verdict(groups), "methods": methods}


def _number(value: float) -> float | None:
    """JSON has no NaN: a missing number is null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
