"""`peftkit merge A B [C ...] --combine ties`: several LoRA adapters of one base combined into one.

    peftkit merge runs/lora-sst2 runs/lora-e2e --combine ties --weights 0.5,0.5 --density 0.5 --out merged/ties

The output is a peft-format adapter directory (`--full`: the combination merged into a plain
transformers model, as a one-source `peftkit merge` writes). Every combination measures itself:
each source run's own eval tasks (from its recipe) are scored for the source adapter ("before",
from its eval.json when that holds them) and for the combination ("after"); both go into
`merge.json` and the card beside the combination, weights and sources.
"""

import json
import logging
import re
from pathlib import Path
from typing import Any

from torch import nn

from peftkit.api import merge_adapter, trainable_parameters
from peftkit.atomic import staged
from peftkit.errors import AdapterError, ConfigError
from peftkit.models import DTYPES, task_of_model
from peftkit.presets import read_yaml
from peftkit.protocol import adapter_parameters

logger = logging.getLogger(__name__)

COMBINED = "combined"


def source_names(sources: list[Path]) -> list[str]:
    """An adapter name per source: its run's directory name, unique, without dots."""
    names = []
    for source in sources:
        stem = source.parent.name if source.name == "adapter" else source.name
        name = re.sub(r"[^A-Za-z0-9_-]", "-", stem) or "source"
        while name in names or name == COMBINED:
            name += "-2"
        names.append(name)
    return names


def source_tasks(source: Path) -> tuple[list[str], dict[str, Any]]:
    """A run directory's eval tasks and options (limit, shots) from its recipe; none for a bare adapter."""
    run = source.parent if source.name == "adapter" else source
    if not (run / "recipe.yaml").is_file():
        return [], {}
    section = read_yaml(run / "recipe.yaml").get("eval") or {}
    return list(section.get("tasks") or []), {k: section[k] for k in ("limit", "shots") if section.get(k) is not None}


def _metrics(report: dict, tasks: list[str]) -> dict[str, float]:
    return {f"{task}/{key}": value for task in tasks for key, value in
            ((report.get("tasks") or {}).get(task, {}).get("metrics") or {}).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def parse_weights(text: str | None, count: int) -> list[float]:
    """`0.5,0.5` -> [0.5, 0.5]; None: equal weights 1/count."""
    if text is None:
        return [1.0 / count] * count
    try:
        weights = [float(w) for w in str(text).split(",")]
    except ValueError:
        raise ConfigError(f"--weights must be numbers separated by commas, e.g. 0.5,0.5, got {text!r}") from None
    if len(weights) != count:
        raise ConfigError(f"--weights has {len(weights)} values for {count} adapters: give one weight per adapter")
    return weights


def load_sources(sources: list[str | Path]) -> tuple[nn.Module, Any, str, list[Path], list[str]]:
    """(model with every source adapter loaded by name, tokenizer, base model, adapter dirs, names).

    Raises:
        AdapterError: sources trained on different base models, or an unreadable adapter.
    """
    from peftkit.checkpoint import load_adapter
    from peftkit.merge import resolve_source, saved_task
    from peftkit.models import load_model

    resolved = [resolve_source(source) for source in sources]
    bases = {str(base) for _, base in resolved}
    if len(bases) > 1:
        listing = "; ".join(f"{s}: {base}" for s, (_, base) in zip(sources, resolved))
        raise AdapterError(f"the adapters were trained on different base models ({listing}): combine adapters of "
                           f"one base model")
    dirs = [adapter for adapter, _ in resolved]
    base = resolved[0][1]
    model, tokenizer = load_model(base, dtype="fp32", device="cpu", **saved_task(dirs[0]))
    names = source_names([Path(s) for s in sources])
    for name, adapter in zip(names, dirs):
        load_adapter(model, adapter, name=name)
    return model, tokenizer, base, dirs, names


def measure(model: nn.Module, tokenizer: Any, sources: list[Path], names: list[str],
            tasks: list[str] | None = None, limit: int | None = None) -> tuple[dict, dict | None]:
    """Each source's eval tasks scored for the source ("before": its run's eval.json when that holds
    them) and for the combination ("after"). The source adapters are deleted on the way, so the
    combination is evaluated alone, as `peftkit eval` of its directory would.

    Returns:
        ({name: {tasks, before, after}}, the combination's eval report over all those tasks, or
        None when no source names tasks).
    """
    from peftkit.evaluation.runner import evaluate_model
    from peftkit.named import delete_adapter, set_adapter

    plan, before = {}, {}
    for name, source in zip(names, sources):
        own, options = source_tasks(source)
        if tasks:
            own, options = list(tasks), {**options, **({"limit": limit} if limit else {})}
        plan[name] = (own, options)
        run = source.parent if source.name == "adapter" else source
        saved = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() and not tasks else {}
        if own and all(task in (saved.get("tasks") or {}) for task in own):
            before[name] = _metrics(saved, own)
        elif own:
            set_adapter(model, name)
            before[name] = _metrics(evaluate_model(model, tokenizer, own, **options), own)
    set_adapter(model, COMBINED)
    for name in names:
        delete_adapter(model, name)
    union = list(dict.fromkeys(t for own, _ in plan.values() for t in own))
    if not union:
        return {name: {"tasks": [], "note": "no recipe: pass --tasks to measure"} for name in names}, None
    options = next(options for own, options in plan.values() if own)
    after = evaluate_model(model, tokenizer, union, **options)
    return {name: {"tasks": own, "before": before.get(name, {}), "after": _metrics(after, own)}
            for name, (own, _) in plan.items()}, after


def combine_to_dir(sources: list[str | Path], out: str | Path, *, combination: str = "linear",
                   weights: list[float] | None = None, density: float | None = None, svd_rank: int | None = None,
                   full: bool = False, dtype: str = "fp32", overwrite: bool = False, evaluate: bool = True,
                   tasks: list[str] | None = None, limit: int | None = None) -> dict:
    """Combine the sources' adapters and write the result; returns the record written as merge.json.

    Raises:
        ConfigError: `out` exists without `overwrite`, or weights that do not match the sources.
        AdapterError: different base models or methods, or a combination that does not fit.
    """
    from peftkit.arithmetic import combine_adapters
    from peftkit.checkpoint import save_adapter
    from peftkit.merge import write_merged
    from peftkit.named import delete_adapter, set_adapter

    out = Path(out)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    weights = weights if weights is not None else [1.0 / len(sources)] * len(sources)
    if len(weights) != len(sources):
        raise ConfigError(f"{len(weights)} weights for {len(sources)} adapters: give one weight per adapter")
    model, tokenizer, base, dirs, names = load_sources(sources)
    combine_adapters(model, names, weights, combination, density, COMBINED, svd_rank=svd_rank)
    measured, report = ({}, None)
    if evaluate:
        measured, report = measure(model, tokenizer, [Path(s) for s in sources], names, tasks, limit)
    else:
        set_adapter(model, COMBINED)
        for name in names:
            delete_adapter(model, name)
    size = sum(p.numel() for p in adapter_parameters(model).values())
    record = {"combination": combination, "weights": weights, "density": density, "svd_rank": svd_rank,
              "base_model": base, "rank": model.peftkit_adapters[COMBINED].r, "parameters": size,
              "total_parameters": trainable_parameters(model)[1],
              "sources": [{"name": n, "path": str(s), "adapter": str(d)} for n, s, d in zip(names, sources, dirs)],
              "metrics": measured}
    notes = [f"Combined by `peftkit merge` with {combination} (weights {', '.join(f'{w:g}' for w in weights)}"
             + (f", density {density:g}" if density is not None else "") + ") from: "
             + ", ".join(f"`{s}`" for s in sources) + "."]
    notes += [f"{name}: " + ", ".join(f"{k} {v['before'].get(k, float('nan')):.2f} -> {v['after'][k]:.2f}"
                                      for k in v["after"]) for name, v in measured.items() if v.get("after")]
    with staged(out) as tmp:  # the combination, merge.json and eval.json appear together or not at all
        if full:
            merged = merge_adapter(model, unload=True).to(DTYPES[dtype])
            write_merged(merged, tokenizer, tmp, {**record, "adapter": ", ".join(map(str, sources)), "dtype": dtype,
                                                  "method": f"{combination} combination",
                                                  "task": task_of_model(merged), "heldout_examples": 0})
        else:
            save_adapter(model, tmp, name=COMBINED, notes=notes, metrics={
                f"{n}: {k}": v for n, m in measured.items() for k, v in (m.get("after") or {}).items()})
            (tmp / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
        if report is not None:
            (tmp / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    return record
