"""Recipes: one YAML file names the model, data, adapter, training and evaluation of a run.

Every value is checked before any model is loaded: unknown keys (with the closest valid
one), wrong types, missing files and impossible values each give a one-line error that names
the key's path, e.g. `train.lr: must be > 0, got -1.0`.
"""

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import ConfigError, ModelError
from peftkit.presets import builtin_dir, builtin_names, read_yaml


@dataclass
class DataConfig:
    # a data name (alpaca, sst2, e2e, gsm8k) or a local JSON/JSONL/CSV/TSV file; a list mixes several sources
    train: str | list[str] = "alpaca"
    format: str | None = None  # alpaca | chat | text | sst2 | e2e | gsm8k | seq2seq; None: each data name's own format
    max_length: int = 512  # tokens per example; longer completions are cut, keeping the end-of-turn
    eval_fraction: float | None = None  # held-out share, never trained on; None: the eval task's (0.05, E2E 0.2 of mrs)
    packing: bool = False  # pack examples into max_length rows; they never attend to each other
    limit: int | None = None  # use at most this many training examples of each source (after the split)

    @property
    def sources(self) -> list[str]:
        return [self.train] if isinstance(self.train, str) else list(self.train)

    def check(self) -> None:
        require(bool(self.sources), "data.train", "needs at least one data source", self.train)
        require(16 <= self.max_length <= 1_000_000, "data.max_length", "must be between 16 and 1000000",
                self.max_length)
        require(self.eval_fraction is None or 0 < self.eval_fraction < 1, "data.eval_fraction",
                "must be in (0, 1)", self.eval_fraction)
        require(self.limit is None or self.limit > 0, "data.limit", "must be > 0", self.limit)


@dataclass
class TrainConfig:
    epochs: float = 1.0  # passes over the training data (ignored when max_steps > 0)
    max_steps: int = -1  # stop after this many optimiser steps; -1: run the epochs
    batch_size: int = 8  # examples per device per step
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 2.0e-4  # peak learning rate (AdamW)
    scheduler: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03  # share of steps warming up linearly from 0
    weight_decay: float = 0.0
    loraplus_lr_ratio: float | None = None  # LoRA+: B's learning rate is lr * this (the paper suggests 16)
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    precision: str = "auto"  # auto (bf16 on a GPU that supports it, else fp32) | fp32 | bf16 | fp16
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    seed: int = 42
    logging_steps: int = 10  # one metrics.jsonl line every N steps
    save_steps: int = 100  # checkpoint every N steps
    save_total_limit: int = 2  # keep the last K checkpoints
    distributed: str = "ddp"  # with --nproc N: ddp (each process holds the whole model) | fsdp (FSDP2, sharded)

    def check(self) -> None:
        require(self.epochs > 0, "train.epochs", "must be > 0", self.epochs)
        require(self.max_steps == -1 or self.max_steps > 0, "train.max_steps", "must be -1 or > 0", self.max_steps)
        for key in ("batch_size", "grad_accum", "logging_steps", "save_steps", "save_total_limit"):
            require(getattr(self, key) > 0, f"train.{key}", "must be > 0", getattr(self, key))
        require(0 < self.lr < 1, "train.lr", "must be in (0, 1)", self.lr)
        require(self.scheduler in ("cosine", "linear", "constant"), "train.scheduler",
                "must be cosine, linear or constant", self.scheduler)
        require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)", self.warmup_ratio)
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0", self.weight_decay)
        require(self.loraplus_lr_ratio is None or (not isinstance(self.loraplus_lr_ratio, bool) and isinstance(
            self.loraplus_lr_ratio, (int, float)) and self.loraplus_lr_ratio > 0), "train.loraplus_lr_ratio",
            "must be empty or a number > 0 (LoRA+ uses 16)", self.loraplus_lr_ratio)
        require(self.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0", self.max_grad_norm)
        require(self.precision in ("auto", "fp32", "bf16", "fp16"), "train.precision",
                "must be auto, fp32, bf16 or fp16", self.precision)
        require(self.distributed in ("ddp", "fsdp"), "train.distributed", "must be ddp or fsdp", self.distributed)


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=list)  # eval tasks run after training (sst2, e2e, gsm8k, alpaca-heldout)
    limit: int | None = None  # examples per task
    shots: int = 0  # in-context examples per prompt

    def check(self) -> None:
        require(self.limit is None or self.limit > 0, "eval.limit", "must be > 0", self.limit)
        require(self.shots >= 0, "eval.shots", "must be >= 0", self.shots)


@dataclass
class SelectionConfig:
    # <eval task>/<metric> scored on a dev split of the training data while training, e.g. sst2/accuracy
    # (peftkit.selection); None: no dev split. Studies with `tune` set it for every run.
    metric: str | None = None
    dev_fraction: float = 0.1  # share of the training rows of the data the task scores, never trained on
    seed: int = 0  # the dev split's seed
    points: int = 3  # dev evaluations spread evenly over training, the last at its end

    def check(self) -> None:
        if self.metric is None:
            return
        from peftkit.selection import parse_metric

        parse_metric(self.metric, "selection.metric")
        require(0 < self.dev_fraction <= 0.5, "selection.dev_fraction", "must be in (0, 0.5]", self.dev_fraction)
        require(self.points >= 2, "selection.points", "must be >= 2 (the end and a point before it)", self.points)


@dataclass
class Recipe:
    model: str = "smollm2-135m"  # registry name, local model directory or hub id
    task: str | None = None  # causal-lm | seq-cls | token-cls | seq2seq; None: the model's own (registry or saved)
    num_labels: int | None = None  # classes of a seq-cls head; needed with seq-cls, must cover the data's labels
    adapter: str | dict = "lora"  # a preset in adapters/, a path, or an inline mapping
    adapter_overrides: dict = field(default_factory=dict)  # fields replacing the preset's, e.g. {r: 16}
    impl: str = "peftkit"  # peftkit, or peft: the same preset through Hugging Face peft, for comparison
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    output: str = "runs/run"  # the run directory
    # A comparison: run name -> recipe overrides, e.g. {qlora: {adapter: qlora}, lora-peft: {impl: peft}}.
    # Each trains into output/<name> with everything else shared; a report on all lands in output/report.
    methods: dict = field(default_factory=dict)
    # Several base models, the same method(s) on each: every model trains into output/<model>
    # (output/<model>-<method> with methods), one report over all of them.
    models: list[str] = field(default_factory=list)
    # Train every run once per seed (train.seed), into <run>-seed<k>; the report shows each method's
    # mean, spread and confidence interval over them. A method may list its own seeds.
    seeds: list[int] = field(default_factory=list)
    # Adapters combined from the trained runs, each into output/<name> and into the report:
    # name -> {combination: linear|cat|svd|ties|dare_linear|dare_ties|magnitude_prune,
    #          sources: [run names] (default: every run), weights: [...] (default: equal), density: 0.5}
    combine: dict = field(default_factory=dict)
    # Tuning before the final runs (peftkit.tune): {grid: {train.lr: [...]}, select: sst2/accuracy,
    # dev_fraction: 0.1}. Each method (which may carry its own `tune: {grid}`) trains one trial per grid
    # point, scored on a dev split of the training data; its best setting then trains once per seed.
    tune: dict = field(default_factory=dict)

    @property
    def is_study(self) -> bool:
        """Several runs (methods, models or seeds) and a report, rather than one run."""
        return bool(self.methods or self.models or self.seeds or self.tune)

    def check(self) -> None:
        """Every check that needs no model: values, the adapter preset, data file, eval tasks."""
        if self.is_study:
            if self.tune:
                from peftkit.tune import check_tune

                check_tune(self)  # every trial's recipe, before the final runs'
            combinations(self, method_recipes(self))  # builds and checks every run's recipe and combination
            return
        require(not self.combine, "combine", "combines the adapters of several runs: list them under methods",
                self.combine)
        self._check_run()

    def _check_run(self) -> None:
        from peftkit.api import resolve_adapter
        from peftkit.data import FORMATS, resolve_source
        from peftkit.models.loader import check_model_task
        from peftkit.models.tasks import TASKS

        require(self.impl in ("peftkit", "peft"), "impl", "must be peftkit or peft", self.impl)
        require(self.task is None or self.task in TASKS, "task", f"must be one of {', '.join(TASKS)}", self.task)
        require(self.num_labels is None or self.num_labels >= 2, "num_labels", "must be >= 2", self.num_labels)
        require(self.num_labels is None or self.task in ("seq-cls", "token-cls", None), "num_labels",
                f"is for task seq-cls or token-cls, not {self.task} (drop num_labels or set task)", self.num_labels)
        for section in (self.data, self.train, self.eval, self.selection):
            section.check()
        try:
            check_model_task(self.model, self.task, self.num_labels)
        except ModelError as exc:
            raise ConfigError(f"task: {exc}") from None
        try:
            cfg = resolve_adapter(self.adapter, **self.adapter_overrides)
        except ConfigError as exc:  # a preset's own field errors already start with "adapter: "
            raise ConfigError(str(exc) if str(exc).startswith("adapter: ") else f"adapter: {exc}") from None
        require(not (cfg.method == "full" and self.impl == "peft"), "impl", "adapter: full trains the model itself, "
                "with no adapter for peft to implement: use impl: peftkit", self.impl)
        formats = []
        for source in self.data.sources:
            path, default_format = resolve_source(source)
            require(path.is_file(), "data.train", "no such file (set PEFTKIT_DATA to the data folder, or give a path)",
                     str(path))
            fmt = self.data.format or default_format
            require(fmt in FORMATS, "data.format", f"must be one of {', '.join(FORMATS)} (for {source})", fmt)
            formats.append(fmt)
        if self.selection.metric:
            from peftkit.selection import dev_format

            wanted = dev_format(self.selection.metric)
            require(wanted in formats, "selection.metric", f"scores {wanted} rows, and no data.train source has "
                     f"format {wanted}: the dev split is carved from the training data", self.selection.metric)
        if self.eval.tasks:
            from peftkit.evaluation import task_names

            known = task_names()
            for task in self.eval.tasks:
                close = difflib.get_close_matches(task, known, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                require(task in known, "eval.tasks", f"unknown task{hint}; known: {', '.join(known)}", task)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunBase:
    """One method on one model, before seeds and tuning: what every run of it shares."""

    name: str  # run name without a seed suffix: <method>, <model>, or <model>-<method>
    where: str  # how errors name it: methods.<name>, models.<model>[, methods.<name>]
    values: dict  # the merged recipe mapping (no output yet)
    seeds: list[int]
    tune: Any  # the method's own `tune: {grid}` (checked by peftkit.tune), None: the study's grid

    @property
    def grid(self) -> dict | None:
        return self.tune.get("grid") if isinstance(self.tune, dict) else None


def run_bases(recipe: Recipe) -> list[RunBase]:
    """Each method on each model with its overrides merged into the shared recipe (sections such
    as `train` are merged key by key, `adapter` is replaced whole); names and keys checked."""
    shared = {k: v for k, v in recipe.to_dict().items() if k not in ("methods", "models", "seeds", "combine", "tune")}
    check_seeds(recipe.seeds, "seeds")
    methods = recipe.methods or {"": {}}
    for name, overrides in methods.items():
        require(isinstance(name, str) and (name == "" and not recipe.methods or _run_name_ok(name)), "methods",
                "run names must be letters, digits, - and _", name)
        require(isinstance(overrides, dict), f"methods.{name}", "expected a mapping of recipe overrides", overrides)
        require(not {"output", "methods", "models"} & set(overrides), f"methods.{name}",
                "cannot set output, methods or models (each run trains into <output>/<name>)", sorted(overrides))
        require(not (recipe.models and "model" in overrides), f"methods.{name}",
                "cannot set model when the recipe lists models (every method runs on each)", sorted(overrides))
    require(len(set(recipe.models)) == len(recipe.models), "models", "lists a model twice", recipe.models)
    bases = []
    for model in recipe.models or [None]:
        label = Path(model).name if model else ""
        require(model is None or bool(label), "models", "entries must be registry names or model directories", model)
        for method, overrides in methods.items():
            overrides = dict(overrides)
            seeds = overrides.pop("seeds", recipe.seeds)
            tune = overrides.pop("tune", None)
            require(tune is None or bool(recipe.tune), f"methods.{method}.tune", "needs the study's tune: {grid, "
                    "select} (a method's own tune only replaces the grid)", tune)
            check_seeds(seeds, f"methods.{method}.seeds")
            where = f"models.{model}" + (f", methods.{method}" if method else "") if model else f"methods.{method}"
            values = merge_values(shared, {**overrides, **({"model": model} if model else {})})
            bases.append(RunBase("-".join(part for part in (label, method) if part), where, values, seeds, tune))
    return bases


def method_recipes(recipe: Recipe, chosen: dict[str, dict] | None = None) -> dict[str, Recipe]:
    """The single-run recipe of each method on each model (and seed), validated; errors name the run.

    A method's output is `<output>/<name>`; with `models`, every method runs on every model: run
    names are `<model>` alone, or `<model>-<method>`; with seeds, `-seed<k>` follows. With `tune`,
    each run takes its method's `chosen` grid values (before tuning: its first grid point, so
    every key is checked) and the study's selection split.
    """
    runs = {}
    for base in run_bases(recipe):
        values = base.values
        if recipe.tune:
            from peftkit.tune import grid_points, tuned_values

            point = (chosen or {}).get(base.name) or grid_points(base.grid or recipe.tune.get("grid"))[0]
            values = tuned_values(recipe, values, point)
        for seed in base.seeds or [None]:
            name = "-".join(part for part in (base.name, f"seed{seed}" if seed is not None else "") if part)
            run_values = values if seed is None else merge_values(values, {"train": {"seed": seed}})
            require(name not in runs, "models", f"two runs would share the directory {name}", base.name)
            runs[name] = build_run({**run_values, "output": str(Path(recipe.output) / name)}, base.where)
    return runs


def build_run(values: dict, where: str) -> Recipe:
    """A single run's recipe from its merged mapping, checked; errors start with `where`."""
    try:
        run = build(Recipe, values, "")
        run._check_run()
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return run


def combinations(recipe: Recipe, runs: dict[str, Recipe]) -> dict[str, dict]:
    """Each `combine` entry with its defaults filled in and checked: combination, sources, weights, density."""
    from peftkit.combine import COMBINATIONS

    specs = {}
    for name, spec in recipe.combine.items():
        key = f"combine.{name}"
        require(isinstance(name, str) and _run_name_ok(name), "combine", "names must be letters, digits, - and _", name)
        require(name not in runs, "combine", "names a trained run: give the combination a name of its own", name)
        require(isinstance(spec, dict), key, "expected a mapping with combination, sources, weights, density", spec)
        unknown = sorted(set(spec) - {"combination", "sources", "weights", "density"})
        require(not unknown, key, "unknown keys (known: combination, sources, weights, density)", unknown)
        combination = spec.get("combination", "linear")
        require(combination in COMBINATIONS, f"{key}.combination", f"use one of {', '.join(COMBINATIONS)}", combination)
        sources = spec.get("sources", list(runs))
        require(isinstance(sources, list) and bool(sources) and all(s in runs for s in sources), f"{key}.sources",
                f"expected a list of trained runs ({', '.join(runs)})", sources)
        weights = spec.get("weights", [1.0 / len(sources)] * len(sources))
        require(isinstance(weights, list) and len(weights) == len(sources) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights), f"{key}.weights",
            f"expected one number per source ({len(sources)})", weights)
        density = spec.get("density")
        require(density is None or (isinstance(density, (int, float)) and 0 < density <= 1), f"{key}.density",
                "expected a number in (0, 1]", density)
        specs[name] = {"combination": combination, "sources": sources, "weights": [float(w) for w in weights],
                       "density": density}
    return specs


def check_seeds(seeds: Any, key: str) -> None:
    require(isinstance(seeds, list) and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds),
             key, "expected a list of seeds (whole numbers >= 0), e.g. [1, 2, 3]", seeds)
    require(len(set(seeds)) == len(seeds), key, "lists a seed twice", seeds)


def _run_name_ok(name: str) -> bool:
    return bool(name) and name.replace("-", "").replace("_", "").replace(".", "").isalnum()


def merge_values(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if key != "adapter" and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def require(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: {rule}, got {value!r}")


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"recipe file {path} does not exist: check the path")
        return path
    shipped = builtin_dir("recipes") / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    names = builtin_names("recipes")
    close = difflib.get_close_matches(name_or_path, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown recipe {name_or_path!r}: {hint}use one of {', '.join(names)} or a path to a YAML file")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-4` -> (["train", "lr"], 1e-4); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} must look like key.path=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML") from None
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = values
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return values


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    """The resolved, validated recipe; raises ConfigError naming the key path of any problem."""
    path = find_recipe(name_or_path)
    values = apply_overrides(read_yaml(path), list(overrides or []))
    recipe = build(Recipe, values, "")
    recipe.check()
    return recipe


def build(cls: type, values: Any, prefix: str) -> Any:
    """A dataclass from a mapping, checking keys and types recursively."""
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown key {prefix}{key}: {hint}")
        kwargs[key] = coerce(hints[key], value, f"{prefix}{key}")
    return cls(**kwargs)


def coerce(hint: Any, value: Any, key: str) -> Any:
    """Check `value` against a type hint (converting int to float and numeric strings)."""
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key + ".")
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"{key}: a value is required")
    for option in options:
        ok, converted = _try(option, value)
        if ok:
            return converted
    wanted = " or ".join(_name(o) for o in options if o is not type(None))
    raise ConfigError(f"{key}: expected {wanted}, got {value!r}")


def _try(option: Any, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(option) or option
    if origin is bool:
        return isinstance(value, bool), value
    if origin is int:
        if isinstance(value, str):
            try:
                return True, int(value)
            except ValueError:
                return False, None
        return isinstance(value, int) and not isinstance(value, bool), value
    if origin is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if origin is str:
        return isinstance(value, str), value
    if origin is list:
        (item,) = typing.get_args(option) or (Any,)
        if isinstance(value, str):  # `eval.tasks=sst2,e2e` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        return isinstance(value, list) and all(isinstance(v, item) for v in value), value
    if origin is dict:
        return isinstance(value, dict), value
    return False, None


def _name(option: Any) -> str:
    origin = typing.get_origin(option) or option
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a mapping"}.get(origin, str(option))


def save_resolved(recipe: Recipe, path: Path, source: str) -> None:
    """The fully resolved recipe, with the command that reproduces it."""
    header = f"# resolved from {source}; rerun with: peftkit train {path}\n"
    path.write_text(header + yaml.safe_dump(recipe.to_dict(), sort_keys=False))
