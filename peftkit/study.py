"""Recipes with `methods` (or `models`): train several methods, or one method on several base
models, on the same data, seed and budget, then compare.

    runs/compare-methods/
      recipe.yaml      the resolved shared recipe, methods included
      methods/         each method's own resolved recipe (`peftkit train methods/lora.yaml` reruns one)
      lora/            one ordinary run directory per method (see peftkit.train); with models:
                       <model>/ or <model>-<method>/
      lora-peft/
      ...
      tune/            with `tune`: each method's trials (tune/<method>/trial-<k>/) and tuning.json,
                       the chosen setting of each (peftkit.tune); the runs above train that setting
      base/eval.json   the base model on the same eval tasks (forgetting, sample outputs)
      ties/            with `combine`: each combination of the runs' adapters (adapter/ with
                       merge.json, eval.json, the sources' recipe.yaml)
      report/          report.md and report.html from `peftkit compare` over all of them

`--resume` keeps the methods that finished, resumes the one that was interrupted from its last
checkpoint, and trains the rest; the report is rewritten at the end. Each method trains in a
process of its own, so its peak memory and speed are its own, not the previous method's.
"""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.recipe import Recipe, combinations, method_recipes, save_resolved
from peftkit.runlock import locked

logger = logging.getLogger(__name__)


def train_methods(recipe: Recipe, *, source: str = "recipe", resume: bool = False, overwrite: bool = False,
                  command: str = "") -> Path:
    """Train every method of `recipe`, then write the comparison report; returns the report directory.

    Raises:
        ConfigError: the output exists (without overwrite/resume), or resuming with a changed recipe.
    """
    runs = method_recipes(recipe)
    with locked(Path(recipe.output)):  # a second study on this output refuses at once
        return _train_methods(recipe, runs, source=source, resume=resume, overwrite=overwrite, command=command)


def _train_methods(recipe: Recipe, runs: dict[str, Recipe], *, source: str, resume: bool, overwrite: bool,
                   command: str) -> Path:
    from peftkit.compare import compare
    from peftkit.train import claim_output

    out = Path(recipe.output)
    claim_output(out, recipe, resume=resume, overwrite=overwrite, holds="comparison")
    save_resolved(recipe, out / "recipe.yaml", source)
    (out / "methods").mkdir(exist_ok=True)
    tuning = None
    if recipe.tune:
        tuning = tune_methods(recipe, source=source, resume=resume)
        runs = method_recipes(recipe, {name: found["chosen"] for name, found in tuning["methods"].items()})
    train_runs({name: (run, out / "methods" / f"{name}.yaml") for name, run in runs.items()}, source=source,
               resume=resume)
    base_eval = evaluate_base(recipe, out / "base" / "eval.json", resume)
    combined = combine_runs(recipe, runs, resume)
    report = compare([Path(run.output) for run in runs.values()] + combined, out / "report", overwrite=True,
                     command=command or f"peftkit train {source}", base_eval=base_eval, tuning=tuning)
    return report


def tune_methods(recipe: Recipe, *, source: str, resume: bool) -> dict:
    """Every method's trials (peftkit.tune), then tune/tuning.json: the chosen setting of each."""
    from peftkit.tune import check_tune, tuning_record

    trials = check_tune(recipe)
    where = Path(recipe.output) / "tune"
    train_runs({f"{name} trial {k}": (run, where / name / f"trial-{k}.yaml")
                for name, found in trials.items() for k, (_, run) in enumerate(found, 1)}, source=source, resume=resume,
               divergence_loses=True)
    record = tuning_record(recipe, trials)
    tmp = where / "tuning.json.tmp"
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(where / "tuning.json")
    for name, found in record["methods"].items():
        score = next(t["score"] for t in found["trials"] if t["values"] == found["chosen"])
        logger.info("%s: chose %s (dev %s %.4g)", name, found["chosen"], record["metric"], score)
    return record


def train_runs(runs: dict[str, tuple[Recipe, Path]], *, source: str, resume: bool,
               divergence_loses: bool = False) -> None:
    """Train each run in a process of its own (its resolved recipe saved at the path given);
    resuming keeps the finished ones and continues an interrupted one from its checkpoint.
    `divergence_loses` (tuning trials): a run whose loss became NaN or infinite is kept as lost
    (its diverged.json says so) instead of stopping the study."""
    from peftkit.tune import DIVERGED

    for index, (name, (run, path)) in enumerate(runs.items(), 1):
        run_dir = Path(run.output)
        lost = divergence_loses and (run_dir / DIVERGED).is_file()
        if resume and (finished(run_dir) or lost):
            logger.info("[%d/%d] %s: %s earlier, kept", index, len(runs), name, "diverged" if lost else "finished")
            continue
        can_resume = resume and any((run_dir / "checkpoints").glob("checkpoint-*"))
        logger.info("[%d/%d] %s: %s", index, len(runs), name, "resuming" if can_resume else "training")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_resolved(run, path, f"{source} ({name})")
        flags = ["--resume"] if can_resume else ["--overwrite"] if resume else []
        done = subprocess.run([sys.executable, "-m", "peftkit", "train", str(path), *flags])
        if done.returncode != 0 and divergence_loses and (run_dir / DIVERGED).is_file():
            logger.warning("%s diverged: it counts as the worst trial", name)
            continue
        if done.returncode != 0:
            raise PeftkitError(f"{name} failed (exit {done.returncode}, see above): fix it and rerun with "
                               f"--resume to keep the runs that finished")


def combine_runs(recipe: Recipe, runs: dict[str, Recipe], resume: bool) -> list[Path]:
    """Each `combine` entry: the sources' adapters combined into <output>/<name>/adapter, evaluated on
    the recipe's tasks (eval.json), with merge.json beside them; returns the directories."""
    from peftkit.merge_adapters import combine_to_dir

    made = []
    for name, spec in combinations(recipe, runs).items():
        where = Path(recipe.output) / name
        made.append(where)
        if resume and (where / "eval.json").is_file() and (where / "adapter" / "merge.json").is_file():
            logger.info("combination %s: finished earlier, kept", name)
            continue
        logger.info("combination %s: %s of %s", name, spec["combination"], ", ".join(spec["sources"]))
        where.mkdir(parents=True, exist_ok=True)
        sources = [Path(runs[source].output) for source in spec["sources"]]
        record = combine_to_dir(sources, where / "adapter", combination=spec["combination"], weights=spec["weights"],
                                density=spec["density"], overwrite=True)  # each source's own (the recipe's) eval tasks
        (where / "adapter" / "eval.json").replace(where / "eval.json")
        (where / "system.json").write_text(json.dumps({"trainable_parameters": record["parameters"],
                                                       "total_parameters": record["total_parameters"]}) + "\n")
        shutil.copyfile(sources[0] / "recipe.yaml", where / "recipe.yaml")  # the sources' shared setup
    return made


def evaluate_base(recipe: Recipe, path: Path, resume: bool) -> Path | None:
    """The base model (no adapter) on the recipe's eval tasks, for forgetting and sample outputs;
    None without eval tasks or with several models."""
    if not recipe.eval.tasks or recipe.models:
        return None
    if resume and path.is_file():
        return path
    logger.info("base model: evaluating %s", ", ".join(recipe.eval.tasks))
    command = [sys.executable, "-m", "peftkit", "eval", recipe.model, "--tasks", ",".join(recipe.eval.tasks),
               "--out", str(path), "--shots", str(recipe.eval.shots)]
    if recipe.eval.limit:
        command += ["--limit", str(recipe.eval.limit)]
    done = subprocess.run(command, stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise PeftkitError(f"evaluating the base model failed (exit {done.returncode}, see above): rerun with --resume")
    return path


def finished(run_dir: Path) -> bool:
    """A run directory that training completed (system.json is written last)."""
    return (run_dir / "system.json").is_file() and ((run_dir / "adapter" / "adapter_config.json").is_file()
                                                    or (run_dir / "model" / "config.json").is_file())
