"""What `peftkit eval` does: resolve a model or a run directory, evaluate, write eval.json.

A run directory (`runs/<name>/`) holds `recipe.yaml` (its `model` key names the base model) and
`adapter/`; evaluating it loads the base, applies the adapter, and writes `eval.json` into the
run. Anything else is a model: a registry name, a model directory or a hub id.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError
from peftkit.evaluation.report import write_report
from peftkit.evaluation.runner import evaluate_model
from peftkit.presets import read_yaml


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and (path / "recipe.yaml").is_file()


def _run_parts(run: Path) -> tuple[str, Path, dict, dict]:
    """(base model, adapter directory, the recipe's eval section, its task and num_labels) of a run directory."""
    recipe = read_yaml(run / "recipe.yaml")
    model = recipe.get("model")
    if not isinstance(model, str) or not model:
        raise ConfigError(f"{run / 'recipe.yaml'} has no model key: it must name the base model the adapter was "
                          f"trained on")
    head = {key: recipe.get(key) for key in ("task", "num_labels")}
    if (run / "model" / "config.json").is_file():  # full fine-tuning: the run saved a plain model
        return str(run / "model"), None, recipe.get("eval") if isinstance(recipe.get("eval"), dict) else {}, head
    adapter = run / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"run {run} has no adapter/adapter_config.json: finish training first, or pass the base "
                          f"model and --adapter DIR")
    return model, adapter, recipe.get("eval") if isinstance(recipe.get("eval"), dict) else {}, head


def output_path(target: str, out: str | None = None) -> Path:
    """Where eval.json goes: `out`, else into a run directory, else ./eval.json."""
    if out:
        return Path(out).expanduser()
    run = Path(target).expanduser()
    return run / "eval.json" if is_run_dir(run) else Path("eval.json")


def eval_command(target: str, tasks: str | None = None, adapter: str | None = None, out: str | None = None,
                 dtype: str | None = None, device: str | None = None,
                 generation: Mapping[str, Any] | None = None, **options: Any) -> tuple[dict[str, Any], Path]:
    """Evaluate a model or a run directory and write eval.json.

    Args:
        target: a registry name, model directory or hub id; or a run directory.
        tasks: comma-separated task names or YAML paths; for a run, None takes the recipe's `eval.tasks`
            (and `shots` / `limit` left unset take the recipe's too).
        adapter: an adapter directory to apply to a model (not to a run, which has its own).
        out: where to write eval.json; None: `<run>/eval.json` for a run, `./eval.json` otherwise.
        dtype, device: as in `peftkit.load_model`.
        generation: generation settings to change.
        **options: passed to `evaluate_model` (shots, limit, data_dir, batch_size, use_cache).

    Returns:
        (the report, the path of eval.json).

    Raises:
        ConfigError: a bad run directory, no tasks, or an adapter given with a run.
    """
    import peftkit

    run = Path(target).expanduser()
    if is_run_dir(run):
        if adapter is not None:
            raise ConfigError(f"{run} is a run directory with its own adapter: drop --adapter, or evaluate the base "
                              f"model with --adapter DIR")
        base, adapter_dir, recipe_eval, head = _run_parts(run)
        tasks = tasks or (",".join(recipe_eval["tasks"]) if recipe_eval.get("tasks") else None)
        for key in ("shots", "limit"):  # what the recipe evaluated with, unless given
            if options.get(key) is None and recipe_eval.get(key) is not None:
                options[key] = recipe_eval[key]
    else:
        base, adapter_dir, head = target, Path(adapter).expanduser() if adapter else None, {}
    if not tasks:
        raise ConfigError("no eval tasks: pass --tasks, e.g. --tasks sst2,e2e,gsm8k,alpaca-heldout")
    model, tokenizer = peftkit.load_model(base, dtype=dtype, device=device, **head)
    if adapter_dir is not None:
        peftkit.load_adapter(model, adapter_dir)
    report = evaluate_model(model, tokenizer, tasks, generation=generation, **options)
    report["model"]["source"] = target
    if report["adapter"] is not None and adapter_dir is not None:
        report["adapter"]["path"] = str(adapter_dir)
    path = write_report(report, output_path(target, out))
    return report, path


def generation_overrides(sample: bool, temperature: float | None, top_k: int | None, top_p: float | None,
                         max_new_tokens: int | None, seed: int | None) -> dict[str, Any] | None:
    """Generation settings given on the command line; None when none were.

    Raises:
        ConfigError: a sampling setting without `--sample`.
    """
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    if not sample and any(v is not None for v in sampling.values()):
        raise ConfigError("--temperature, --top-k and --top-p only apply to sampling: add --sample")
    values = {**sampling, "max_new_tokens": max_new_tokens, "seed": seed, "greedy": False if sample else None}
    return {k: v for k, v in values.items() if v is not None} or None


def eval_from_args(args: Any) -> tuple[dict[str, Any], Path]:
    """`eval_command` with the options of `peftkit eval` (an argparse namespace)."""
    generation = generation_overrides(args.sample, args.temperature, args.top_k, args.top_p, args.max_new_tokens,
                                      args.seed)
    return eval_command(args.target, args.tasks, adapter=args.adapter, out=args.out, dtype=args.dtype,
                        device=args.device, generation=generation, shots=args.shots, limit=args.limit,
                        data_dir=args.data, batch_size=args.batch_size, use_cache=not args.no_cache)
