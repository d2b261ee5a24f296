"""What one run directory says about itself: its recipe, metrics, per-example statistics, cost
and loss curve (`summarize`), for reports."""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from peftkit.errors import ConfigError
from peftkit.methods import method_label
from peftkit.methods.full import saved_dir

SEED_SUFFIX = re.compile(r"-seed\d+$")


@dataclass
class RunSummary:
    name: str
    method: str
    impl: str
    recipe: dict
    metrics: dict[str, float] = field(default_factory=dict)
    trainable: int = 0
    total: int = 0
    peak_memory_mb: float = float("nan")
    tokens_per_s: float = float("nan")
    wall_time_s: float = float("nan")
    adapter_bytes: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # eval task -> why it was not scored
    scores: dict[str, dict[str, list]] = field(default_factory=dict)  # eval task -> per-example statistics
    examples: dict[str, list[dict]] = field(default_factory=dict)  # eval task -> a few predictions
    train_time_s: float = float("nan")
    selection: dict | None = None  # selection.json: the dev split's metric during training (peftkit.selection)

    @property
    def group(self) -> str:
        """The method's name without a seed suffix: runs of one group differ only in their seed."""
        return SEED_SUFFIX.sub("", self.name)

    @property
    def trainable_pct(self) -> float:
        return 100 * self.trainable / self.total if self.total else float("nan")


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def method_name(adapter_config: dict) -> str:
    kind = adapter_config.get("peft_type", "?").lower()
    if kind == "lora":
        if (adapter_config.get("peftkit") or {}).get("base_quantization"):
            return "qlora"
        return "dora" if adapter_config.get("use_dora") else "lora"
    return {"prefix_tuning": "prefix", "prompt_tuning": "prompt"}.get(kind, kind)


def recipe_method(recipe: dict) -> str | None:
    """The method a run's recipe asked for (peft's saved config cannot tell QLoRA from LoRA)."""
    from peftkit.api import resolve_adapter

    try:
        cfg = resolve_adapter(recipe.get("adapter", "lora"), **(recipe.get("adapter_overrides") or {}))
    except ConfigError:
        return None
    return method_label(cfg)


def summarize(run: Path) -> RunSummary:
    """What one run directory says about itself."""
    saved = saved_dir(run)  # adapter/, or a full fine-tuning's model/
    if not (run / "recipe.yaml").is_file() or not saved.is_dir():
        raise ConfigError(f"{run} is not a finished run directory (needs recipe.yaml and adapter/ or model/): "
                          f"pass directories written by peftkit train")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    system = _json(run / "system.json")
    metrics, skipped, scores, examples = {}, {}, {}, {}
    for task, result in (_json(run / "eval.json").get("tasks") or {}).items():
        if result.get("skipped"):
            skipped[task] = result["skipped"]
        if result.get("scores"):
            scores[task] = result["scores"]
        if result.get("examples"):
            examples[task] = result["examples"]
        for key, value in (result.get("metrics") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{task}/{key}"] = float(value)
    losses = []
    if (run / "metrics.jsonl").is_file():
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if "loss" in record:
                losses.append((record["step"], record["loss"]))
    method = recipe_method(recipe) or method_name(_json(run / "adapter" / "adapter_config.json"))
    impl = recipe.get("impl", "peftkit")
    combined = _json(run / "adapter" / "merge.json")  # a combination of other runs' adapters (peftkit merge A B)
    if combined.get("combination"):
        method = f"{combined['combination']} of {' + '.join(s['name'] for s in combined.get('sources', []))}"
        impl = "combination"
    return RunSummary(
        name=run.name, method=method, impl=impl, recipe=recipe, metrics=metrics,
        trainable=system.get("trainable_parameters", 0), total=system.get("total_parameters", 0),
        peak_memory_mb=system.get("peak_memory_mb", float("nan")), tokens_per_s=system.get("tokens_per_s", float("nan")),
        wall_time_s=system.get("wall_time_s", float("nan")),
        adapter_bytes=sum(p.stat().st_size for p in saved.iterdir() if p.suffix == ".safetensors"),
        losses=losses, skipped=skipped, scores=scores, examples=examples,
        train_time_s=system.get("train_time_s", float("nan")), selection=_json(run / "selection.json") or None)
