"""Recipes with `methods`: train several methods on the same data, seed and budget, then compare.

    runs/compare-methods/
      recipe.yaml      the resolved shared recipe, methods included
      lora/            one ordinary run directory per method (see peftkit.train)
      lora-peft/
      ...
      report/          report.md and report.html from `peftkit compare` over all of them

`--resume` keeps the methods that finished, resumes the one that was interrupted from its last
checkpoint, and trains the rest; the report is rewritten at the end.
"""

import logging
import shutil
from pathlib import Path

import yaml

from peftkit.errors import ConfigError
from peftkit.recipe import Recipe, method_recipes, save_resolved

logger = logging.getLogger(__name__)


def train_methods(recipe: Recipe, *, source: str = "recipe", resume: bool = False, overwrite: bool = False,
                  command: str = "") -> Path:
    """Train every method of `recipe`, then write the comparison report; returns the report directory.

    Raises:
        ConfigError: the output exists (without overwrite/resume), or resuming with a changed recipe.
    """
    from peftkit.compare import compare
    from peftkit.train import train

    runs = method_recipes(recipe)
    out = Path(recipe.output)
    saved = out / "recipe.yaml"
    if resume:
        if not saved.is_file():
            raise ConfigError(f"--resume: {out} holds no comparison (no recipe.yaml): start it without --resume")
        if yaml.safe_load(saved.read_text()) != yaml.safe_load(yaml.safe_dump(recipe.to_dict())):
            raise ConfigError(f"--resume: the recipe differs from {saved}: resume with the same recipe and overrides")
    elif out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {out} already exists: pass --overwrite to replace it, --resume to "
                              f"continue it, or set output=another/dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    save_resolved(recipe, saved, source)

    for index, (name, run) in enumerate(runs.items(), 1):
        run_dir = Path(run.output)
        if resume and finished(run_dir):
            logger.info("[%d/%d] %s: finished earlier, kept", index, len(runs), name)
            continue
        can_resume = resume and any((run_dir / "checkpoints").glob("checkpoint-*"))
        logger.info("[%d/%d] %s: %s", index, len(runs), name, "resuming" if can_resume else "training")
        train(run, source=f"{source} (methods.{name})", resume=can_resume, overwrite=resume and not can_resume)
    report = compare([Path(run.output) for run in runs.values()], out / "report", overwrite=True,
                     command=command or f"peftkit train {source}")
    return report


def finished(run_dir: Path) -> bool:
    """A run directory that training completed (system.json is written last)."""
    return (run_dir / "system.json").is_file() and (run_dir / "adapter" / "adapter_config.json").is_file()
