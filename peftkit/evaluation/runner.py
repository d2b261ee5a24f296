"""`evaluate_model`: run eval tasks on a model in memory, with caching; what training calls after it trains."""

import dataclasses
import datetime
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.errors import ConfigError
from peftkit.evaluation import cache
from peftkit.evaluation.data import default_data_root, resolve_file
from peftkit.evaluation.generation import GenerationUnsupported
from peftkit.evaluation.spec import GenerationSettings, TaskResult, TaskSpec, load_spec
from peftkit.presets import build_config

logger = logging.getLogger(__name__)


def task_list(tasks: str | Sequence[str | Path | TaskSpec]) -> list[str | Path | TaskSpec]:
    """Task names, YAML paths or specs, from a list or a comma-separated string."""
    items = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    if not items:
        raise ConfigError("no eval tasks given: name at least one, e.g. --tasks sst2,e2e")
    return items


def _with_generation(spec: TaskSpec, generation: Mapping[str, Any] | GenerationSettings | None) -> TaskSpec:
    if generation is None or not hasattr(spec, "generation"):
        return spec
    if not isinstance(generation, GenerationSettings):
        values = {**dataclasses.asdict(spec.generation), **generation}
        generation = build_config(GenerationSettings, values, where=f"{spec.name}.generation")
    return dataclasses.replace(spec, generation=generation)


def _with_files(spec: TaskSpec, root: Path | None, data_file: Path | None) -> TaskSpec:
    """The spec with every data file it reads as a checked absolute path."""
    if data_file is not None:
        spec = dataclasses.replace(spec, data=str(data_file.resolve()))
    files = {f: str(resolve_file(getattr(spec, f), root, spec.name).resolve()) for f in spec.data_fields()}
    return dataclasses.replace(spec, **files)


def prepare_specs(tasks: str | Sequence[str | Path | TaskSpec], shots: int | None = None,
                  batch_size: int | None = None, generation: Mapping[str, Any] | GenerationSettings | None = None,
                  data_dir: str | Path | None = None) -> list[TaskSpec]:
    """Load each task's spec, apply the overrides, and resolve its data files.

    Args:
        tasks: shipped names (`eval/*.yaml`), YAML paths or specs; a comma-separated string works.
        shots: in-context examples for tasks that take them; None keeps each spec's own.
        batch_size: replaces each spec's batch size; None keeps them.
        generation: generation settings to change (a mapping) or replace (settings) in generative tasks.
        data_dir: the data root; or, with a single task, that task's data file. None: `$PEFTKIT_DATA`
            or `../shared/data` beside the repository.

    Raises:
        ConfigError: an unknown task or setting, a data file given for several tasks, or missing data.
    """
    specs = []
    for item in task_list(tasks):
        spec = load_spec(item, batch_size=batch_size)
        if shots is not None:
            if hasattr(spec, "shots"):
                spec = dataclasses.replace(spec, shots=shots)
            elif shots:
                logger.info("%s takes no in-context examples: shots=%d does not apply to it", spec.name, shots)
        specs.append(_with_generation(spec, generation))
    root, data_file = default_data_root(), None
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if path.is_file():
            if len(specs) > 1:
                raise ConfigError(f"--data {path} is a file, which fits one task, but {len(specs)} tasks were given: "
                                  f"pass a data folder, or one task")
            data_file = path
        elif path.is_dir():
            root = path
        else:
            raise ConfigError(f"--data {path} does not exist: pass the data folder or a task's data file")
    return [_with_files(spec, root, data_file) for spec in specs]


def run_task(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: TaskSpec, limit: int | None,
             progress: bool) -> TaskResult:
    """One task, the model in eval mode for its duration."""
    from peftkit.evaluation.tasks import TASKS
    from peftkit.models.tasks import task_of_model

    kind = task_of_model(model)
    if kind not in TASKS[spec.task].MODEL_TASKS:
        raise GenerationUnsupported(f"it scores {' or '.join(TASKS[spec.task].MODEL_TASKS)} models, and this model "
                                    f"is {kind}")
    training = model.training
    model.eval()
    try:
        return TASKS[spec.task].run(model, tokenizer, spec, limit, progress)
    finally:
        model.train(training)


def evaluate_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase,
                   tasks: str | Sequence[str | Path | TaskSpec], shots: int | None = None, limit: int | None = None,
                   data_dir: str | Path | None = None,
                   generation: Mapping[str, Any] | GenerationSettings | None = None, batch_size: int | None = None,
                   use_cache: bool = True, cache_dir: str | Path | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Run eval tasks on a model (with or without an adapter) and return the eval.json content.

    Args:
        model: a causal LM, e.g. from `peftkit.load_model`, possibly with an adapter applied.
        tokenizer: its tokenizer (it needs a chat template).
        tasks: shipped task names (`sst2`, `e2e`, `gsm8k`, `alpaca-heldout`), YAML paths or specs,
            as a list or a comma-separated string.
        shots: in-context examples for sst2, e2e and gsm8k; None keeps each spec's (0 in shipped specs).
        limit: score only the first `limit` examples of each task (for quick runs).
        data_dir: the data root, or a single task's data file; see `prepare_specs`.
        generation: generation settings to change, e.g. `{"max_new_tokens": 32}` or
            `{"greedy": False, "temperature": 0.7, "seed": 1}`.
        batch_size: replaces each spec's batch size.
        use_cache: reuse and store results on disk (see `peftkit.evaluation.cache`).
        cache_dir: where the cache lives; None: `<peftkit cache>/eval`.
        progress: show progress bars (on a terminal).

    Returns:
        `{"model": {...}, "adapter": {...} | None, "tasks": {name: {"metrics", "n", "seconds", "cached",
        "settings", "details", "examples", "scores"}}, "seconds", "created", "peftkit_version"}`. Metrics
        are percentages; losses are nats per token. `scores` holds per-example statistics, from
        which `peftkit.stats` recomputes each metric on resamples (confidence intervals).

    Raises:
        ConfigError: an unknown task or setting, or missing or malformed data.
    """
    import peftkit

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    start = time.perf_counter()
    specs = prepare_specs(tasks, shots, batch_size, generation, data_dir)
    model_id, adapter_id = cache.model_identity(model), cache.adapter_identity(model)
    directory = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    results = {}
    for spec in specs:
        key = cache.cache_key(model_id, adapter_id, spec, limit)
        hit = cache.load(directory, spec, key) if use_cache else None
        if hit is not None:
            result, seconds = hit
            logger.info("%s: cached result from %s (%.1f s when computed)", spec.name, directory, seconds)
        else:
            logger.info("%s: evaluating%s", spec.name, f" (limit {limit})" if limit else "")
            task_start = time.perf_counter()
            try:
                result = run_task(model, tokenizer, spec, limit, progress)
            except GenerationUnsupported as exc:
                logger.warning("%s: skipped: %s", spec.name, exc)
                results[spec.name] = {"metrics": {}, "n": 0, "seconds": 0.0, "cached": False, "skipped": str(exc),
                                      "settings": {**dataclasses.asdict(spec), "limit": limit}}
                continue
            seconds = time.perf_counter() - task_start
            if use_cache:
                cache.store(directory, spec, key, result, seconds)
        results[spec.name] = {"metrics": result.metrics, "n": result.n, "seconds": round(seconds, 2),
                              "cached": hit is not None, "settings": {**dataclasses.asdict(spec), "limit": limit},
                              "details": result.details, "examples": result.examples, "scores": result.scores}
    return {"model": model_id, "adapter": adapter_id, "tasks": results,
            "seconds": round(time.perf_counter() - start, 2),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "peftkit_version": peftkit.__version__}
