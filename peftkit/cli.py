"""The `peftkit` command line. Errors are one line on stderr; `--debug` shows the traceback."""

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from peftkit.combine import COMBINATIONS
from peftkit.errors import ConfigError, PeftkitError

if TYPE_CHECKING:
    from peftkit.recipe import Recipe

logger = logging.getLogger("peftkit")


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def cmd_models(args: argparse.Namespace) -> None:
    from peftkit.models import cache_dir, list_models

    print(f"{'name':<14} {'cached':<7} description  [licence]")
    for name, cached, description, licence in list_models():
        print(f"{name:<14} {'yes' if cached else 'no':<7} {description}  [{licence}]")
    print(f"\ncache: {cache_dir()}")


def cmd_demo(args: argparse.Namespace) -> None:
    import torch

    import peftkit
    from peftkit.api import format_trainable

    start = time.perf_counter()
    model, tokenizer = peftkit.load_model(args.model, dtype="fp32", device="cpu" if args.cpu else None)
    print(f"loaded {args.model} in {time.perf_counter() - start:.1f} s")
    peftkit.apply_adapter(model, args.adapter)
    print(f"adapter {args.adapter}: {format_trainable(model)}")
    messages = [{"role": "user", "content": args.prompt}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True).to(model.device)
    with torch.no_grad():
        adapted = model(**inputs).logits
        peftkit.merge_adapter(model, unload=True)
        merged = model(**inputs).logits
    print(f"merged into a plain {type(model).__name__}: max |logit diff| vs the adapter = "
          f"{(merged - adapted).abs().max().item():.2e}")
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"Q: {args.prompt}\nA: {answer.strip()}")


def cmd_train(args: argparse.Namespace) -> None:
    from peftkit.recipe import find_recipe, load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # validated before anything heavy happens
    if recipe.is_study:
        _train_methods(args, recipe)
        return
    if args.nproc > 1:
        _relaunch(args, recipe)
        return
    from peftkit.train import train

    out = train(recipe, source=str(find_recipe(args.recipe)), resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") != "0":
        return  # the main process says where the run is
    from peftkit.methods.full import saved_dir

    saved = saved_dir(out)
    print(f"{saved.name + ':':<8} {saved}")
    print(f"metrics: {out / 'metrics.jsonl'}")
    if (out / "eval.json").is_file():
        print(f"eval:    {out / 'eval.json'}")


def _train_methods(args: argparse.Namespace, recipe) -> None:
    from peftkit.recipe import find_recipe, method_recipes
    from peftkit.study import train_methods

    if args.nproc > 1:
        raise PeftkitError("--nproc: a recipe with methods or models trains them one after another in one process; "
                           "drop --nproc, or train each run's recipe with --nproc")
    command = " ".join(["peftkit train", args.recipe, *args.overrides] + ["--resume"] * args.resume)
    report = train_methods(recipe, source=str(find_recipe(args.recipe)), resume=args.resume,
                           overwrite=args.overwrite, command=command)
    print(f"runs:   {', '.join(str(report.parent / name) for name in method_recipes(recipe))}")
    print(f"report: {report / 'report.md'}\n        {report / 'report.html'}")


def _relaunch(args: argparse.Namespace, recipe: "Recipe") -> None:
    """Data parallel (DDP or FSDP): the same command in N processes, one process group (`peftkit.launch`)."""
    from peftkit.api import resolve_adapter
    from peftkit.distributed import check_distributed
    from peftkit.launch import launch

    check_distributed(recipe, resolve_adapter(recipe.adapter, **recipe.adapter_overrides))  # once, not per process
    argv = ["--debug"] * args.debug + ["train", args.recipe, *args.overrides]
    argv += ["--resume"] * args.resume + ["--overwrite"] * args.overwrite
    code = launch([sys.executable, "-m", "peftkit", *argv], args.nproc)
    if code != 0:
        raise SystemExit(code)  # the failed worker's one-line error is shown already


def cmd_eval(args: argparse.Namespace) -> None:
    from peftkit.evaluation import eval_from_args, format_table

    report, path = eval_from_args(args)
    print(format_table(report))
    print(f"\neval: {path}")


def cmd_merge(args: argparse.Namespace) -> None:
    from peftkit.merge import merge_to_dir

    if len(args.source) > 1 or args.combine:
        return cmd_combine(args)
    if args.full or args.weights or args.density is not None:
        raise ConfigError("--full, --weights and --density combine several adapters: pass two or more sources and "
                          "--combine (one source is always merged into a full model)")
    record = merge_to_dir(args.source[0], args.out, dtype=args.dtype, base=args.base, overwrite=args.overwrite)
    print(f"merged {record['method']} adapter into {record['base_model']} ({record['merged_into']} weights) -> {args.out}")
    perplexity = (f"; held-out perplexity {record['perplexity_adapter']:.4f} (adapter) -> "
                  f"{record['perplexity_merged']:.4f} (merged)" if record["task"] == "causal-lm" else "")
    print(f"max |logit diff| vs adapter (fp32): {record['max_logit_diff_fp32']:.2e}{perplexity}")
    if record["warning"]:
        print(f"warning: {record['warning']}")


def cmd_combine(args: argparse.Namespace) -> None:
    from peftkit.merge_adapters import combine_to_dir, parse_weights

    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    record = combine_to_dir(args.source, args.out, combination=args.combine or "linear",
                            weights=parse_weights(args.weights, len(args.source)), density=args.density,
                            svd_rank=args.svd_rank, full=args.full, dtype=args.dtype, overwrite=args.overwrite,
                            evaluate=not args.no_eval, tasks=tasks, limit=args.limit)
    kind = "plain transformers model" if args.full else "peft-format adapter"
    print(f"combined {len(args.source)} adapters with {record['combination']} (rank {record['rank']}) -> "
          f"{args.out} ({kind})")
    for name, measured in record["metrics"].items():
        for key, after in (measured.get("after") or {}).items():
            print(f"  {name}: {key} {measured['before'].get(key, float('nan')):.2f} (source) -> {after:.2f} (combined)")


def cmd_export(args: argparse.Namespace) -> None:
    from peftkit.export import export

    record = export(args.source, fmt=args.format, outtype=args.outtype, out=args.out, base=args.base,
                    overwrite=args.overwrite, llamacpp=args.llamacpp)
    print(f"wrote {record['path']} ({record['bytes'] / 2**20:.1f} MiB, {record['outtype']})")
    print(f"reloaded with transformers' GGUF loader on {record['prompts']} prompts: max |logit diff| "
          f"{record['max_logit_diff']:.2e}, top-1 agreement {100 * record['top1_agreement']:.2f}%, greedy "
          f"generations equal {record['greedy_generations_equal']}, tokenizer round trip "
          f"{record['tokenizer_round_trip']}")
    if llama := record.get("llamacpp"):
        print(f"loaded by {llama['reader']} on {llama['prompts']} prompts: token ids equal {llama['token_ids_equal']}, "
              f"max |logit diff| {llama['max_logit_diff']:.2e}, top-1 agreement {100 * llama['top1_agreement']:.2f}%, "
              f"greedy continuations equal {llama['greedy_equal']}")
    if record["warning"]:
        print(f"warning: {record['warning']}")


def cmd_compare(args: argparse.Namespace) -> None:
    from peftkit.compare import compare

    out = compare(args.runs, args.out, overwrite=args.overwrite, base_eval=args.base_eval)
    print(f"report: {out / 'report.md'}\n        {out / 'report.html'}")


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str, str]] = {
    "models": (cmd_models, "list registry models and whether each is cached", "example:\n  peftkit models"),
    "train": (cmd_train, "fine-tune a model with an adapter, as a recipe says",
              "examples:\n  peftkit train lora-alpaca-smoke\n  peftkit train lora-alpaca train.lr=1e-4 impl=peft "
              "output=runs/peft\n  peftkit train my-recipe.yaml --resume\n  peftkit train lora-sst2 --nproc 2\n"
              "  peftkit train compare-methods   # several methods, same data and budget, one report"),
    "eval": (cmd_eval, "evaluate a model or a run on eval tasks; prints a table and writes eval.json",
             "examples:\n  peftkit eval smollm2-135m --tasks sst2,e2e --limit 50\n"
             "  peftkit eval smollm2-135m --tasks sst2 --shots 4\n"
             "  peftkit eval runs/lora-alpaca --tasks alpaca-heldout,gsm8k\n"
             "  peftkit eval smollm2-135m --adapter runs/x/adapter --tasks e2e --sample --temperature 0.7 --seed 1"),
    "merge": (cmd_merge, "fold an adapter into its base and write a plain transformers model; or combine several "
              "adapters into one",
              "examples:\n  peftkit merge runs/lora-alpaca --out merged/lora-alpaca\n"
              "  peftkit merge runs/lora-sst2 runs/lora-e2e --combine ties --weights 0.5,0.5 --density 0.5 --out merged/ties\n"
              "  peftkit merge runs/lora-sst2 runs/lora-e2e --combine linear --full --out merged/linear-model\n"
              "  peftkit merge runs/qlora-alpaca --out merged/q --dtype bf16\n"
              "  peftkit merge runs/qlora-alpaca --out merged/q-orig --base original   # the QLoRA merge gap"),
    "export": (cmd_export, "write a model, or an adapter merged into its base, as a GGUF file, and check it",
               "examples:\n  peftkit export runs/lora-alpaca --format gguf\n"
               "  peftkit export runs/lora-alpaca --format gguf --outtype q8_0 --out lora-alpaca.q8_0.gguf\n"
               "  peftkit export merged/lora-alpaca --format gguf   # a directory from peftkit merge\n"
               "  peftkit export smollm2-135m --llamacpp   # llama.cpp loads it too (python bench/llamacpp.py --build)"),
    "compare": (cmd_compare, "compare run directories in a Markdown table and an offline HTML page with plots",
                "example:\n  peftkit compare runs/lora-alpaca runs/lora-alpaca-peft runs/qlora-alpaca --out reports/x"),
    "demo": (cmd_demo, "load a model, apply an adapter, merge it and generate an answer",
             "example:\n  peftkit demo --adapter dora --prompt 'Name three primary colours.'"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftkit", description="Parameter-efficient fine-tuning from scratch.",
                                     formatter_class=Formatter)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text, example) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, epilog=example, formatter_class=Formatter)
    train = sub.choices["train"]
    train.add_argument("recipe", help="a shipped recipe name (see recipes/) or a path to a YAML recipe")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. train.lr=1e-4")
    train.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.add_argument("--nproc", type=int, default=1, help="data-parallel processes (CPU: gloo)")
    ev = sub.choices["eval"]
    ev.add_argument("target", metavar="MODEL_OR_RUN", help="registry name, model directory, hub id, or a run directory")
    ev.add_argument("--tasks", help="comma-separated eval tasks (eval/*.yaml) or YAML paths; a run: its recipe's")
    ev.add_argument("--shots", type=int, help="in-context examples (sst2, e2e, gsm8k); unset: each task's")
    ev.add_argument("--limit", type=int, help="score only the first N examples of each task")
    ev.add_argument("--data", help="data root folder, or one task's file; unset: $PEFTKIT_DATA or ../shared/data")
    ev.add_argument("--adapter", help="adapter directory to apply to MODEL (a run brings its own)")
    ev.add_argument("--out", help="where to write eval.json; unset: into the run, else ./eval.json")
    ev.add_argument("--batch-size", type=int, help="sequences per batch; unset: each task's")
    ev.add_argument("--max-new-tokens", type=int, help="generation length; unset: each task's")
    ev.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    ev.add_argument("--temperature", type=float, help="sampling temperature (with --sample)")
    ev.add_argument("--top-k", type=int, help="sampling top-k (with --sample)")
    ev.add_argument("--top-p", type=float, help="sampling nucleus mass (with --sample)")
    ev.add_argument("--seed", type=int, help="sampling seed; unset: each task's")
    ev.add_argument("--no-cache", action="store_true", help="recompute even when a cached result exists")
    ev.add_argument("--dtype", help="fp32, bf16 or fp16; unset: fp32 on CPU, bf16 on CUDA")
    ev.add_argument("--device", help="cpu or cuda; unset: cuda when available")
    merge = sub.choices["merge"]
    merge.add_argument("source", metavar="RUN_OR_ADAPTER", nargs="+",
                       help="a run or adapter directory; several: combine their adapters into one")
    merge.add_argument("--out", required=True, help="directory for the merged model (or the combined adapter)")
    merge.add_argument("--combine", choices=COMBINATIONS, help="how to combine several adapters; unset: linear")
    merge.add_argument("--weights", help="one weight per adapter, e.g. 0.5,0.5; unset: equal weights")
    merge.add_argument("--density", type=float, help="fraction of entries kept by ties, dare_* and magnitude_prune")
    merge.add_argument("--svd-rank", type=int, help="rank of svd combinations; unset: the largest source rank")
    merge.add_argument("--full", action="store_true", help="write the combination merged into a plain model")
    merge.add_argument("--tasks", help="eval tasks to measure every source on; unset: each run's recipe tasks")
    merge.add_argument("--limit", type=int, help="with --tasks: examples per task")
    merge.add_argument("--no-eval", action="store_true", help="skip measuring the combination")
    merge.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the saved weights")
    merge.add_argument("--base", default="4bit", choices=["4bit", "original"],
                       help="QLoRA only: merge into the dequantised 4-bit base it was trained on, or the original")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    exp = sub.choices["export"]
    exp.add_argument("source", metavar="RUN_OR_DIR",
                     help="a run, adapter or model directory (adapters are merged into their base first)")
    exp.add_argument("--format", default="gguf", choices=["gguf"], help="file format")
    exp.add_argument("--outtype", default="f16", choices=["f16", "q8_0", "f32"],
                     help="weight type: f16, q8_0 (8-bit blocks of 32) or f32; norms stay f32")
    exp.add_argument("--out", help="the .gguf file to write; unset: <name>-<outtype>.gguf in the run or model dir")
    exp.add_argument("--base", default="4bit", choices=["4bit", "original"],
                     help="QLoRA only: merge into the dequantised 4-bit base it was trained on, or the original")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing file")
    exp.add_argument("--llamacpp", action="store_true",
                     help="also load the file in llama.cpp and compare (needs llama_cpp: python bench/llamacpp.py --build)")
    comp = sub.choices["compare"]
    comp.add_argument("runs", nargs="+", metavar="RUN", help="run directories written by peftkit train")
    comp.add_argument("--out", required=True, help="directory for report.md and report.html")
    comp.add_argument("--overwrite", action="store_true", help="replace an existing report directory")
    comp.add_argument("--base-eval", metavar="FILE", help="the base model's eval.json on the same tasks (peftkit eval "
                      "MODEL --out FILE): adds forgetting and the base model's sample outputs")
    demo = sub.choices["demo"]
    demo.add_argument("--model", default="smollm2-135m", help="registry name, local directory or hub id")
    demo.add_argument("--adapter", default="lora", help="adapter preset name or YAML path")
    demo.add_argument("--prompt", default="What is the capital of France?", help="the question to answer")
    demo.add_argument("--max-new-tokens", type=int, default=40, help="generation length")
    demo.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is available")
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt: both unwind through `finally` blocks,
    which remove the hidden temp outputs (see `peftkit.atomic`)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def output_of(args: argparse.Namespace) -> Path | None:
    """The file or directory that eval, merge or export writes; None for the other commands."""
    if args.command == "merge":
        return Path(args.out)
    if args.command == "export":
        from peftkit.export import default_path

        return Path(args.out) if args.out else default_path(args.source, args.outtype)
    if args.command == "eval":
        from peftkit.evaluation.command import output_path

        return output_path(args.target, args.out)
    return None


def _stamp(path: Path | None) -> tuple[int, int] | None:
    """What identifies the output on disk now (a rename into place changes it)."""
    if path is None:
        return None
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def interrupted_message(command: str, signum: int, out: Path | None, written: bool) -> str:
    """The line for a command stopped by `signum`: what it left at `out` (`written`: its output changed)."""
    name = signal.Signals(signum).name
    if out is None:
        return f"{command} interrupted by {name}"
    if written:  # the signal came while the output was being renamed into place, and waited for that
        return f"{command} interrupted by {name} just after it wrote {out}, which is complete"
    return f"{command} interrupted by {name}: nothing was written to {out}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    main_process = os.environ.get("RANK", "0") == "0"  # under data parallel, the others log warnings only
    level = logging.DEBUG if args.debug else logging.INFO if main_process else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    # bitsandbytes and kernels: a kernel hint and an offline-mode notice at import
    for noisy in ("transformers", "httpx", "urllib3", "filelock", "bitsandbytes", "kernels"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.debug else logging.ERROR)
    term = args.command != "train" and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if term else None  # train checkpoints on SIGTERM
    out = before = None
    try:
        out = output_of(args)
        before = _stamp(out)
        COMMANDS[args.command][0](args)
    except PeftkitError as exc:
        if args.debug:
            raise
        print(f"peftkit: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", signal.SIGINT)
        written = out is not None and _stamp(out) not in (before, None)
        print(f"peftkit: {interrupted_message(args.command, signum, out, written)}", file=sys.stderr)
        return 128 + signum
    except Exception as exc:  # anything else is a bug: one line, the traceback with --debug
        if args.debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"peftkit: internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
