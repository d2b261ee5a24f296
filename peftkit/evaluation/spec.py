"""Eval task specs: what a task reads, how it prompts, and how it generates, as YAML in `eval/`.

A spec names its implementation (`task: sst2 | e2e | gsm8k | alpaca-heldout`); the shipped
files `eval/<name>.yaml` are found by name, and a path to a YAML file of one's own works the same
way. Each task module declares its own spec dataclass (a `TaskSpec` plus its fields), so unknown
keys are rejected with the closest valid key, as adapter presets are. `TaskResult` is what a
task hands back.
"""

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from peftkit.errors import ConfigError
from peftkit.presets import build_config, builtin_dir, builtin_names, read_yaml


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer{' or null' if allow_none else ''}, got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ConfigError(f"{name} must be a number between 0 and 1 (exclusive), got {value!r}")


@dataclass
class GenerationSettings:
    """How generative tasks decode; greedy unless `greedy: false`."""

    greedy: bool = True  # argmax decoding; false samples with temperature / top_k / top_p
    temperature: float = 1.0  # sampling only: logits are divided by it
    top_k: int | None = None  # sampling only: keep the k most likely tokens; null keeps all
    top_p: float | None = None  # sampling only: nucleus mass; null keeps all
    max_new_tokens: int = 64  # generation stops here or at the end-of-turn token
    seed: int = 0  # sampling seed; batch b draws with seed + b, so a rerun gives the same text

    def __post_init__(self) -> None:
        if not isinstance(self.greedy, bool):
            raise ConfigError(f"generation.greedy must be true or false, got {self.greedy!r}")
        temperature = self.temperature
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ConfigError(f"generation.temperature must be a positive number, got {self.temperature!r}")
        check_positive_int("generation.top_k", self.top_k, allow_none=True)
        if self.top_p is not None:
            if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
                raise ConfigError(f"generation.top_p must be in (0, 1] or null, got {self.top_p!r}")
        check_positive_int("generation.max_new_tokens", self.max_new_tokens)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"generation.seed must be an integer, got {self.seed!r}")


@dataclass
class TaskSpec:
    """Fields every task has; task modules subclass this (or `PromptedSpec`) with their own."""

    name: str  # how results are labelled; defaults to the YAML file's stem
    task: str  # which implementation runs the spec: sst2, e2e, gsm8k, alpaca-heldout
    data: str  # the task's data file: relative to the data root, or an absolute path
    batch_size: int = 8  # sequences per forward pass or generate call

    def __post_init__(self) -> None:
        check_positive_int(f"{self.name}: batch_size", self.batch_size)
        if not isinstance(self.data, str) or not self.data:
            raise ConfigError(f"{self.name}: data must be a file path, got {self.data!r}")

    def data_fields(self) -> tuple[str, ...]:
        """The fields naming files this run reads (relative to the data root, or absolute)."""
        return ("data",)


@dataclass
class PromptedSpec(TaskSpec):
    """A task that prompts the model through its chat template, optionally with k shots."""

    PLACEHOLDERS: ClassVar[tuple[str, ...]] = ("text",)  # what `prompt` must mention

    prompt: str = "{text}"  # the user message; `{name}` placeholders are filled per example
    shots: int = 0  # in-context examples, as prior chat turns
    seed: int = 42  # picks the in-context examples

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.shots, bool) or not isinstance(self.shots, int) or self.shots < 0:
            raise ConfigError(f"{self.name}: shots must be a non-negative integer, got {self.shots!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"{self.name}: seed must be an integer, got {self.seed!r}")
        if not isinstance(self.prompt, str) or any(f"{{{p}}}" not in self.prompt for p in self.PLACEHOLDERS):
            wanted = " and ".join(f"{{{p}}}" for p in self.PLACEHOLDERS)
            raise ConfigError(f"{self.name}: prompt must be a string that contains {wanted}, got {self.prompt!r}")

    def fill(self, **values: str) -> str:
        """The prompt with its placeholders replaced (plain replacement: other braces are kept)."""
        text = self.prompt
        for key, value in values.items():
            text = text.replace(f"{{{key}}}", value)
        return text


def generation_settings(value: Any, where: str) -> GenerationSettings:
    """A spec's `generation` entry: a mapping of settings, or settings already built."""
    if isinstance(value, GenerationSettings):
        return value
    if isinstance(value, dict):
        return build_config(GenerationSettings, value, where=f"{where}.generation")
    raise ConfigError(f"{where}: generation must be a mapping of settings, got {value!r}")


@dataclass
class TaskResult:
    """What a task returns: metrics (percentages, except losses), example count, and how it was run."""

    metrics: dict[str, float]
    n: int  # examples scored (for e2e: meaning representations)
    details: dict[str, Any] = field(default_factory=dict)  # split, prompting, tokenisation: what a reader needs
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few predictions, for a look
    scores: dict[str, list] = field(default_factory=dict)  # per-example statistics, for intervals (peftkit.stats)


def spec_path(name_or_path: str | Path) -> Path:
    """The YAML file of a shipped task name, or the given path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    shipped = builtin_dir("eval") / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = task_names()
    close = difflib.get_close_matches(str(name_or_path), names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown eval task {str(name_or_path)!r}: {hint}use one of {', '.join(names)} "
                      f"or a path to a task YAML file")


def task_names() -> list[str]:
    """The shipped eval tasks (`eval/*.yaml`)."""
    return builtin_names("eval")


def load_spec(name_or_path: str | Path | TaskSpec, **overrides: Any) -> TaskSpec:
    """A validated task spec from a shipped name, a YAML path, or a spec, plus field overrides.

    Raises:
        ConfigError: unknown task or key, a bad value, or a YAML file that does not parse.
    """
    from peftkit.evaluation.tasks import TASKS  # the task modules import this module

    if isinstance(name_or_path, TaskSpec):
        values = {f.name: getattr(name_or_path, f.name) for f in dataclasses.fields(name_or_path)}
        path_name = name_or_path.name
    else:
        path = spec_path(name_or_path)
        values = read_yaml(path)
        path_name = path.stem
    values.setdefault("name", path_name)
    values.update({k: v for k, v in overrides.items() if v is not None})
    kind = values.get("task")
    if kind not in TASKS:
        raise ConfigError(f"eval task {values['name']!r}: task must be one of {', '.join(TASKS)}, got {kind!r}")
    if "data" not in values:
        raise ConfigError(f"eval task {values['name']!r} has no data key: name its data file, e.g. data: sst2/dev.tsv")
    return build_config(TASKS[kind].SPEC, values, where=f"eval task {values['name']}")
