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
from peftkit.groups import (Group, converged, interval, lower_is_better, main_metric, metric_names,
                            probabilities_better, rank_intervals, references)
from peftkit.run_summary import RunSummary

COSTS = {"trainable parameters": "trainable", "peak memory": "peak_memory_mb", "training time": "train_time_s"}
CONVERGENCE = ("Convergence is not judged: these runs have no selection split to follow during training "
               "(`tune:` carves one).")


def cost(group: Group, attribute: str) -> float:
    """A cost of the method for the Pareto fronts (NaN where the runs did not record it)."""
    return float(group.first.trainable or "nan") if attribute == "trainable" else group.mean(attribute)


def verdict(groups: list[Group]) -> list[str]:
    """The verdict's sentences (Markdown), from the rank intervals and the costs."""
    metrics = metric_names([r for g in groups for r in g.runs])
    main = main_metric(metrics)
    if main is None:
        return ["No metric to judge: the runs were not evaluated."]
    edges = [g.name for g in groups if at_grid_edge(g)]
    edge = ([f"Chosen at the edge of their grid (the best value may lie beyond it): {', '.join(edges)}."]
            if edges else [])
    return [best_line(groups, main)] + pareto_lines(groups, main) + [convergence_line(groups)] + edge


def at_grid_edge(group: Group) -> bool:
    """Whether a tuned method's chosen value is the first or last of a grid key with 3+ values."""
    if group.tuning is None:
        return False
    grid, chosen = group.tuning["grid"], group.tuning["chosen"]
    return any(len(grid[key]) > 2 and value in (grid[key][0], grid[key][-1]) for key, value in chosen.items())


def convergence_line(groups: list[Group]) -> str:
    """The methods whose dev metric still rose over the last third of training."""
    found = {g.name: converged(g) for g in groups}
    judged = {name: ok for name, ok in found.items() if ok is not None}
    if not judged:
        return CONVERGENCE
    rising = [name for name, ok in judged.items() if not ok]
    line = (f"Did not converge (the dev metric still rose over the last third of training, P >= 0.95 paired over "
            f"dev examples and seeds): {', '.join(rising)}." if rising else
            "Every method converged: none has a dev metric still rising over the last third of training.")
    unjudged = [name for name, ok in found.items() if ok is None]
    return line + (f" Not judged (no dev split): {', '.join(unjudged)}." if unjudged else "")


def tuning_rows(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    """Per tuned method: its grid, each trial's dev score, the chosen setting, and convergence."""
    rows = []
    for g in groups:
        if g.tuning is None:
            continue
        grid = "; ".join(f"{key}: {', '.join(map(str, values))}" for key, values in g.tuning["grid"].items())
        trials = ", ".join("diverged" if t.get("diverged") else "-" if t["score"] is None else f"{t['score']:.4g}"
                           for t in g.tuning["trials"])
        chosen = ", ".join(f"{key}={value}" for key, value in g.tuning["chosen"].items())
        chosen += " (grid edge)" if at_grid_edge(g) else ""
        ok = converged(g)
        rows.append([g.name, grid, trials, chosen, "-" if ok is None else "yes" if ok else "no (still rising)"])
    return ["method", "grid", "dev score per trial", "chosen", "converged"], rows


def tuning_note(tuning: dict) -> str:
    """How the settings were chosen: the dev split, the search and its budget."""
    split = tuning.get("split") or {}
    return (f"Each method's setting was chosen by {tuning['metric']} on a dev split of the training data: "
            f"{split.get('size')} {split.get('source_format')} rows ({split.get('fraction')} of them, seed "
            f"{split.get('seed')}), never trained on; the eval tasks' own data is read only by the final runs. "
            f"Search: {tuning.get('search')}, {tuning.get('trials_per_method')} trials per method. The chosen "
            f"setting then trained once per seed (the trials are not among the seeds). Converged: the dev metric "
            f"did not still rise over the last third of training.")



def best_line(groups: list[Group], main: str) -> str:
    """Which methods cannot be told apart from the best on `main`, and which could not be ranked."""
    ranked = rank_intervals(groups, main)
    if not ranked:
        return (f"On {main}, no ranks: fewer than two methods stored per-example statistics for it on the same "
                f"examples.")
    best = [name for name, (low, _) in ranked.items() if low == 1]
    if len(best) == 1:
        line = f"On {main}, {best[0]} is the best: it alone has a 95 % rank interval that includes 1."
    else:
        line = (f"On {main}, {', '.join(best)} cannot be told apart as the best: each has a 95 % rank interval "
                f"that includes 1.")
    left_out = [g.name for g in groups if g.name not in ranked]
    if left_out:
        line += (f" Not ranked (no per-example statistics for {main}, or other examples): "
                 f"{', '.join(left_out)}.")
    return line


def pareto_lines(groups: list[Group], main: str) -> list[str]:
    """Per cost, the methods no other beats on both that cost and `main` (point estimates)."""
    sign = -1.0 if lower_is_better(main) else 1.0  # the front keeps the higher y
    values = [sign * interval(g, main).value if interval(g, main) else float("nan") for g in groups]
    lines = []
    for label, attribute in COSTS.items():
        front = plots.pareto_front([(cost(g, attribute), v) for g, v in zip(groups, values)])
        if front:
            lines.append(f"Pareto front of {main} against {label} (means): "
                         f"{', '.join(groups[i].name for i in front)}.")
    return lines


def rank_rows(groups: list[Group]) -> tuple[list[str], list[list[str]]]:
    """Per method, its rank interval on each metric and its probability of beating LoRA (and full
    fine-tuning) on the main metric."""
    metrics = [m for m in metric_names([r for g in groups for r in g.runs]) if not m.endswith("/perplexity")]
    main = main_metric(metrics)
    ranks = {m: rank_intervals(groups, m) for m in metrics}
    chances = {r.name: probabilities_better(groups, main, r) for r in references(groups)} if main else {}
    header = ["method"] + [f"rank: {m}" for m in metrics] + [f"P(beats {name}) on {main}" for name in chances]
    rows = []
    for g in groups:
        row = [g.name] + [_rank(ranks[m].get(g.name)) for m in metrics]
        row += [f"{chances[name][g.name]:.2f}" if g.name in chances[name] else "-" for name in chances]
        rows.append(row)
    return header, rows


def _rank(found: tuple[int, int] | None) -> str:
    return "-" if found is None else f"[{found[0]}, {found[1]}]"


def report_json(groups: list[Group], runs: list[RunSummary], tuning: dict | None = None) -> dict:
    """The report for other tools: model, selection, and per method its seeds, metrics (mean, sd,
    95 % interval), rank intervals, probabilities of beating the references, and costs."""
    metrics = metric_names(runs)
    main = main_metric(metrics)
    ranks = {m: rank_intervals(groups, m) for m in metrics}
    chances = {r.name: {m: probabilities_better(groups, m, r) for m in metrics} for r in references(groups)}
    models = list(dict.fromkeys(str(r.recipe.get("model")) for r in runs))
    methods = []
    for g in groups:
        found = {m: interval(g, m) for m in metrics}
        methods.append({
            "name": g.name, "method": g.first.method, "impl": g.first.impl,
            "tuning": {k: g.tuning[k] for k in ("grid", "trials", "chosen") if k in g.tuning} if g.tuning else None,
            "seeds": [(r.recipe.get("train") or {}).get("seed") for r in g.runs],
            "metrics": {m: {"mean": _number(i.value), "sd": _number(i.spread),
                            "ci": [_number(i.low), _number(i.high)]} for m, i in found.items() if i is not None},
            "rank": {m: list(ranks[m][g.name]) for m in metrics if g.name in ranks[m]},
            "p_beats": {name: {m: p[g.name] for m, p in per_metric.items() if g.name in p}
                        for name, per_metric in chances.items() if name != g.name},
            "trainable": g.first.trainable or None, "peak_memory_mb": _number(g.mean("peak_memory_mb")),
            "train_seconds": _number(g.mean("train_time_s")), "converged": converged(g),
        })
    selection = None
    if tuning:
        split = tuning.get("split") or {}
        selection = {"split": {k: split.get(k) for k in ("source_format", "fraction", "seed")},
                     "size": split.get("size"), "metric": tuning["metric"], "search": tuning.get("search"),
                     "trials_per_method": tuning.get("trials_per_method")}
    return {"model": models[0] if len(models) == 1 else models, "selection": selection, "main_metric": main,
            "verdict": verdict(groups), "methods": methods}


def _number(value: float) -> float | None:
    """JSON has no NaN: a missing number is null."""
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None
