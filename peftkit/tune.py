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
import typing
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError
from peftkit.recipe import Recipe, _merge, _require, build_run, run_bases

TUNE_KEYS = ("grid", "select", "dev_fraction", "seed", "points")
NOT_TUNABLE = ("output", "methods", "models", "seeds", "combine", "tune", "selection")


def check_tune(recipe: Recipe) -> dict[str, list[tuple[dict, Recipe]]]:
    """The study's tune section, every method's grid, and every trial's recipe, checked; returns
    the trials per method.

    Raises:
        ConfigError: an unknown key, an empty grid, a metric no eval task of the recipe produces, a
            dev_fraction outside (0, 0.5], a grid without methods, or unequal numbers of trials.
    """
    from peftkit.selection import parse_metric

    tune = recipe.tune
    _require(isinstance(tune, dict), "tune", "expected a mapping: {grid: {train.lr: [...]}, select: sst2/accuracy}",
             tune)
    unknown = sorted(set(tune) - set(TUNE_KEYS))
    _require(not unknown, "tune", f"unknown keys (known: {', '.join(TUNE_KEYS)})", unknown)
    _require(bool(recipe.methods), "tune", "tunes each method of a study: list the methods under methods:", tune)
    _require("select" in tune, "tune.select", "is required: the metric trials are chosen by, e.g. sst2/accuracy", None)
    task, _ = parse_metric(tune["select"], "tune.select")
    _require(task in recipe.eval.tasks, "tune.select", f"no eval task of the recipe produces it (eval.tasks: "
             f"{', '.join(recipe.eval.tasks) or 'none'}): add {task} to eval.tasks or select another metric",
             tune["select"])
    fraction = tune.get("dev_fraction", 0.1)
    _require(isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 0.5,
             "tune.dev_fraction", "must be a number in (0, 0.5]", fraction)
    check_grid(tune.get("grid"), "tune.grid")
    count = len(grid_points(tune["grid"]))
    trials = {}
    for base in run_bases(recipe):
        if base.tune is not None:
            key = f"{base.where}.tune"
            _require(isinstance(base.tune, dict) and set(base.tune) == {"grid"}, key,
                     "a method's tune holds its own grid only: {grid: {train.lr: [...]}}", base.tune)
            check_grid(base.grid, f"{key}.grid")
            _require(len(grid_points(base.grid)) == count, f"{key}.grid", f"gives {len(grid_points(base.grid))} "
                     f"trials and the study's grid {count}: every method gets the same number of trials", base.grid)
        trials[base.name] = trial_recipes(recipe, base)
    return trials


def check_grid(grid: Any, key: str) -> None:
    _require(isinstance(grid, dict) and bool(grid), key, "needs at least one recipe key with a list of values, "
             "e.g. {train.lr: [1.0e-4, 1.0e-3]}", grid)
    for name, values in grid.items():
        check_key(name, key)
        _require(isinstance(values, list) and bool(values), f"{key}.{name}", "expected a non-empty list of values",
                 values)
        _require(len({json.dumps(v, sort_keys=True) for v in values}) == len(values), f"{key}.{name}",
                 "lists a value twice", values)


def check_key(name: Any, key: str) -> None:
    """A dotted recipe key a grid may set: a top-level key, a section's field, or an adapter override."""
    parts = name.split(".") if isinstance(name, str) else [""]
    hints = typing.get_type_hints(Recipe)
    fields = [f.name for f in dataclasses.fields(Recipe) if f.name not in NOT_TUNABLE]
    if parts[0] in NOT_TUNABLE:
        raise ConfigError(f"{key}: {name} cannot be tuned (tunable: a recipe key such as train.lr, data.max_length "
                          f"or adapter_overrides.r)")
    if parts[0] not in fields:
        _unknown(name, key, fields)
    hint = hints[parts[0]]
    if dataclasses.is_dataclass(hint):
        inner = [f.name for f in dataclasses.fields(hint)]
        if len(parts) != 2 or parts[1] not in inner:
            _unknown(name, key, [f"{parts[0]}.{f}" for f in inner])
    elif parts[0] == "adapter_overrides":
        _require(len(parts) == 2 and bool(parts[1]), key, "adapter_overrides keys look like adapter_overrides.r", name)
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
    values = _merge(values, {"selection": {"metric": recipe.tune["select"],
                                           "dev_fraction": recipe.tune.get("dev_fraction", 0.1),
                                           "seed": recipe.tune.get("seed", 0), "points": recipe.tune.get("points", 3)}})
    for name, value in point.items():
        parts = name.split(".")
        nested: Any = value
        for part in reversed(parts[1:]):
            nested = {part: nested}
        values = _merge(values, {parts[0]: nested})
    return values


def trial_recipes(recipe: Recipe, base) -> list[tuple[dict, Recipe]]:
    """A method's trials: (grid point, recipe) each, trained into tune/<method>/trial-<k> with
    the recipe's own train.seed and no eval task (the eval data is for the final runs only)."""
    trials = []
    for k, point in enumerate(grid_points(base.grid or recipe.tune["grid"]), 1):
        values = _merge(tuned_values(recipe, base.values, point), {"eval": {"tasks": []}})
        values["output"] = str(Path(recipe.output) / "tune" / base.name / f"trial-{k}")
        trials.append((point, build_run(values, f"{base.where}, trial {k} {point}")))
    return trials


def choose(scores: list[float], metric: str) -> int:
    """The best trial's index (the first of equals: the grid's order breaks ties)."""
    from peftkit.groups import lower_is_better

    sign = -1 if lower_is_better(metric) else 1
    return max(range(len(scores)), key=lambda i: (sign * scores[i], -i))


def tuning_record(recipe: Recipe, trials: dict[str, list[tuple[dict, Recipe]]]) -> dict:
    """tuning.json: the selection split and, per method, its grid, trials and chosen values."""
    from peftkit.selection import final_score, read_selection

    metric = recipe.tune["select"]
    grids = {base.name: base.grid or recipe.tune["grid"] for base in run_bases(recipe)}
    methods, split = {}, None
    for name, found in trials.items():
        scores = [final_score(Path(run.output)) for _, run in found]
        if any(s is None for s in scores):
            missing = [str(run.output) for (_, run), s in zip(found, scores) if s is None]
            raise ConfigError(f"tune: trial(s) {', '.join(missing)} have no dev score: rerun the study with --resume")
        best = choose(scores, metric)
        runs = [str(Path(run.output).relative_to(recipe.output)) for _, run in found]
        methods[name] = {"grid": grids[name], "trials": [{"values": point, "score": score, "run": where} for
                                                         (point, _), score, where in zip(found, scores, runs)],
                         "chosen": found[best][0]}
        split = split or read_selection(Path(found[0][1].output))["split"]
    return {"metric": metric, "split": split, "search": "grid: every trial at the recipe's full budget",
            "trials_per_method": len(next(iter(trials.values()))), "methods": methods}
