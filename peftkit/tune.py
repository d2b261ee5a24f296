"""Tuning inside a study, on a dev split of the training data, never on the eval data.

    tune:
      grid: {train.lr: [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3]}   # dotted recipe keys -> values
      select: sst2/accuracy                               # an eval task of the recipe / one of its metrics
      dev_fraction: 0.1                                   # of the training rows that task scores
    methods:
      vera: {adapter: vera, tune: {grid: {train.lr: [1.0e-3, 3.0e-3, 1.0e-2, 3.0e-2]}}}   # its own grid

Every method trains one trial per grid point (a method's own grid replaces the study's and must
hold as many points: every method gets the same number of trials, each the recipe's budget). A
trial trains on the training rows minus the dev split and runs no eval task; its score is the
dev metric at its end (`peftkit.selection`). The best point is each method's chosen setting, which
then trains once per seed (`seeds`); the trials are not reused as seeds. The choice is grid search
at the full budget for every trial (no successive halving).

    runs/<study>/tune/<method>/trial-<k>/    each trial's run directory (selection.json inside)
    runs/<study>/tune/tuning.json            per method: grid, trials [{values, score}], chosen
"""

import dataclasses
import difflib
import itertools
import json
import math
import typing
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError
from peftkit.recipe import Recipe, RunBase, build_run, merge_values, require, run_bases
from peftkit.stats import LOWER_IS_BETTER

DIVERGED = "diverged.json"  # a run whose loss became NaN or infinite leaves it (peftkit.train): a lost trial


TUNE_KEYS = ("grid", "select", "dev_fraction", "seed", "points")
# What a grid may not set: the study's shape, and what decides which rows the eval tasks score
# (a grid over them could move eval rows into the dev split or into training).
NOT_TUNABLE = ("output", "methods", "models", "seeds", "combine", "tune", "selection", "model", "eval",
               "data.train", "data.format", "data.eval_fraction")


def check_tune(recipe: Recipe) -> dict[str, list[tuple[dict, Recipe]]]:
    """The study's tune section, every method's grid, and every trial's recipe, checked.

    Args:
        recipe: a study recipe with `tune` and `methods`.

    Returns:
        Per method (run name without seed), its trials: (grid point, the trial's recipe) each.

    Raises:
        ConfigError: an unknown key, an empty grid, a metric no eval task of the recipe produces, a
            dev_fraction outside (0, 0.5], a grid without methods, or unequal numbers of trials.
    """
    tune = recipe.tune
    check_section(recipe)
    count = len(grid_points(tune["grid"]))
    trials = {}
    for base in run_bases(recipe):
        if base.tune is not None:
            key = f"{base.where}.tune"
            require(isinstance(base.tune, dict) and set(base.tune) == {"grid"}, key,
                    "a method's tune holds its own grid only: {grid: {train.lr: [...]}}", base.tune)
            check_grid(base.grid, f"{key}.grid")
            require(len(grid_points(base.grid)) == count, f"{key}.grid", f"gives {len(grid_points(base.grid))} "
                    f"trials and the study's grid {count}: every method gets the same number of trials", base.grid)
        trials[base.name] = trial_recipes(recipe, base)
    return trials


def check_section(recipe: Recipe) -> None:
    """The study-level keys of `tune`: select, dev_fraction, seed, points and the grid."""
    from peftkit.selection import parse_metric

    tune = recipe.tune
    require(isinstance(tune, dict), "tune", "expected a mapping: {grid: {train.lr: [...]}, select: sst2/accuracy}",
            tune)
    unknown = sorted(set(tune) - set(TUNE_KEYS))
    require(not unknown, "tune", f"unknown keys (known: {', '.join(TUNE_KEYS)})", unknown)
    require(bool(recipe.methods), "tune", "tunes each method of a study: list the methods under methods:", tune)
    require("select" in tune, "tune.select", "is required: the metric trials are chosen by, e.g. sst2/accuracy", None)
    task, _ = parse_metric(tune["select"], "tune.select")
    require(task in recipe.eval.tasks, "tune.select", f"no eval task of the recipe produces it (eval.tasks: "
            f"{', '.join(recipe.eval.tasks) or 'none'}): add {task} to eval.tasks or select another metric",
            tune["select"])
    fraction = tune.get("dev_fraction", 0.1)
    require(isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 0.5,
            "tune.dev_fraction", "must be a number in (0, 0.5]", fraction)
    for name, low, default in (("seed", 0, 0), ("points", 2, 3)):
        value = tune.get(name, default)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= low, f"tune.{name}",
                f"must be a whole number >= {low}", value)
    check_grid(tune.get("grid"), "tune.grid")


def check_grid(grid: Any, key: str) -> None:
    """A grid: dotted recipe keys that may be tuned, each with a non-empty list of distinct values."""
    require(isinstance(grid, dict) and bool(grid), key, "needs at least one recipe key with a list of values, "
            "e.g. {train.lr: [1.0e-4, 1.0e-3]}", grid)
    for name, values in grid.items():
        check_key(name, key)
        require(isinstance(values, list) and bool(values), f"{key}.{name}", "expected a non-empty list of values",
                 values)
        require(len({json.dumps(v, sort_keys=True) for v in values}) == len(values), f"{key}.{name}",
                 "lists a value twice", values)


def check_key(name: Any, key: str) -> None:
    """A dotted recipe key a grid may set: a top-level key, a section's field, or an adapter override."""
    parts = name.split(".") if isinstance(name, str) else [""]
    hints = typing.get_type_hints(Recipe)
    fields = [f.name for f in dataclasses.fields(Recipe) if f.name not in NOT_TUNABLE]
    if parts[0] in NOT_TUNABLE or name in NOT_TUNABLE:
        raise ConfigError(f"{key}: {name} cannot be tuned (it shapes the study or decides which rows the eval "
                          f"tasks score): tune a key such as train.lr, data.max_length or adapter_overrides.r")
    if parts[0] not in fields:
        _unknown(name, key, fields)
    hint = hints[parts[0]]
    if dataclasses.is_dataclass(hint):
        inner = [f.name for f in dataclasses.fields(hint)]
        if len(parts) != 2 or parts[1] not in inner:
            _unknown(name, key, [f"{parts[0]}.{f}" for f in inner])
    elif parts[0] == "adapter_overrides":
        require(len(parts) == 2 and bool(parts[1]), key, "adapter_overrides keys look like adapter_overrides.r", name)
    elif len(parts) != 1:
        _unknown(name, key, fields)


def _unknown(name: str, key: str, valid: list[str]) -> None:
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(valid)}"
    raise ConfigError(f"{key}: unknown recipe key {name}: {hint}")


def grid_points(grid: dict) -> list[dict]:
    """Every combination of the grid's values, the first key varying slowest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def tuned_values(recipe: Recipe, values: dict, point: dict) -> dict:
    """A run's recipe mapping with a grid point's values set and the study's selection split."""
    values = merge_values(values, {"selection": {"metric": recipe.tune["select"],
                                                 "dev_fraction": recipe.tune.get("dev_fraction", 0.1),
                                                 "seed": recipe.tune.get("seed", 0),
                                                 "points": recipe.tune.get("points", 3)}})
    for name, value in point.items():
        parts = name.split(".")
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        values = merge_values(values, {parts[0]: nested})
    return values


def trial_recipes(recipe: Recipe, base: RunBase) -> list[tuple[dict, Recipe]]:
    """A method's trials: (grid point, recipe) each, trained into tune/<method>/trial-<k> with
    the recipe's own train.seed and no eval task (the eval data is for the final runs only)."""
    trials = []
    for k, point in enumerate(grid_points(base.grid or recipe.tune["grid"]), 1):
        values = merge_values(tuned_values(recipe, base.values, point), {"eval": {"tasks": []}})
        values["output"] = str(Path(recipe.output) / "tune" / base.name / f"trial-{k}")
        run = build_run(values, f"{base.where}, trial {k} {point}")
        require(run.data.eval_fraction is None, f"{base.where}.data.eval_fraction", "a study with tune keeps each "
                "eval task's own held-out split (so no dev or training row is an eval row): drop data.eval_fraction",
                run.data.eval_fraction)
        trials.append((point, run))
    return trials


def choose(scores: list[float | None], metric: str) -> int | None:
    """The best trial's index (the first of equals: the grid's order breaks ties); trials without a
    finite score (diverged) never win. None when no trial has one."""
    sign = -1 if metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER else 1
    finite = [i for i, s in enumerate(scores) if s is not None and math.isfinite(s)]
    return max(finite, key=lambda i: (sign * scores[i], -i)) if finite else None


def tuning_record(recipe: Recipe, trials: dict[str, list[tuple[dict, Recipe]]]) -> dict:
    """tuning.json: the selection split and, per method, its grid, trials and chosen values."""
    from peftkit.selection import final_score, read_selection

    metric = recipe.tune["select"]
    grids = {base.name: base.grid or recipe.tune["grid"] for base in run_bases(recipe)}
    methods, split = {}, None
    for name, found in trials.items():
        dirs = [Path(run.output) for _, run in found]
        diverged = [(d / DIVERGED).is_file() for d in dirs]
        records = [None if gone else read_selection(d) for d, gone in zip(dirs, diverged)]
        scores = [final_score(record) for record in records]
        missing = [str(d) for d, s, gone in zip(dirs, scores, diverged) if s is None and not gone]
        if missing:
            raise ConfigError(f"tune: trial(s) {', '.join(missing)} have no dev score: delete them and rerun the "
                              f"study with --resume")
        best = choose(scores, metric)
        if best is None:
            raise ConfigError(f"tune: every trial of {name} diverged or scored no finite {metric}: lower its grid's "
                              f"learning rates (methods.{name}.tune.grid) and rerun with --resume")
        trial_rows = [{"values": point, "score": score if score is None or math.isfinite(score) else None,
                       "run": str(d.relative_to(recipe.output)), **({"diverged": True} if gone else {})}
                      for (point, _), score, d, gone in zip(found, scores, dirs, diverged)]
        methods[name] = {"grid": grids[name], "trials": trial_rows, "chosen": found[best][0],
                         "split": records[best]["split"]}
        split = split or methods[name]["split"]
    return {"metric": metric, "split": split, "search": "grid: every trial at the recipe's full budget",
            "trials_per_method": len(next(iter(trials.values()))), "methods": methods}
