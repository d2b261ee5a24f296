"""The `peftkit train` pipeline end to end: impl=peftkit vs impl=peft on shipped smoke recipes.

    python bench/pipeline.py [--recipes lora-sst2-smoke ...] [--reps 3] [--eval]

Each run is its own `peftkit train` process (a fresh interpreter, so no allocator or thread
state leaks between runs); the two impls alternate in ABBA order, so drift on a shared
machine hits both alike. Per run it reads the run's system.json (training tokens/s, training
seconds / steps) and the process's peak RSS from the kernel (`wait4`), which covers loading,
training and (with --eval) the recipe's eval tasks. It reports peftkit / peft ratios: the
median over repetitions of each pair's ratio, with the lowest and highest.

It also reads the training peak from system.json (the peak RSS from the first step on, after
loading: a QLoRA base is read in full precision before it is quantised) and the bytes of the
4-bit base. QLoRA also runs a third way, `fp32-base`: the same recipe with the base left in fp32
(LoRA r 64 with dropout, all-linear), which QLoRA's memory is measured against.

Eval is skipped by default (`eval.tasks=[]`): the figure is training speed and memory.
Prefix-tuning runs use the `prefix` preset on both sides (peft has no `init: tokens`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import write_record  # noqa: E402

RECIPES = ["lora-sst2-smoke", "lora-alpaca-smoke", "qlora-alpaca-smoke", "prefix-alpaca-smoke"]
OVERRIDES = {"prefix-alpaca-smoke": ["adapter=prefix"]}
IMPLS = ("peftkit", "peft")
# Extra ways to run a recipe, reported beside peftkit's: name -> overrides.
VARIANTS = {"qlora-alpaca-smoke": {"fp32-base": ["impl=peftkit", "adapter_overrides.quantize=null"]}}


def run_once(recipe: str, impl: str, out: Path, with_eval: bool) -> dict:
    """One `peftkit train` process; its figures, or an error naming the log."""
    impl_args = VARIANTS.get(recipe, {}).get(impl, [f"impl={impl}"])
    args = [sys.executable, "-m", "peftkit", "train", recipe, *impl_args, f"output={out}",
            *OVERRIDES.get(recipe, []), *([] if with_eval else ["eval.tasks=[]"]), "--overwrite"]
    log = out.with_suffix(".log")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    started = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{recipe} impl={impl} failed:\n{log.read_text()[-3000:]}")
    system = json.loads((out / "system.json").read_text())
    return {"tokens_per_s": system["tokens_per_s"], "step_s": system["train_time_s"] / system["steps"],
            "peak_rss_mb": usage.ru_maxrss / 1024, "train_peak_rss_mb": system["peak_memory_mb"],
            "quantized_base_bytes": system.get("quantized_base_bytes"), "wall_s": time.perf_counter() - started,
            "train_tokens": system["train_tokens"]}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per quantity: each way's median, and peftkit's ratio to each other way, per repetition."""
    summary = {}
    for key in ("tokens_per_s", "step_s", "peak_rss_mb", "train_peak_rss_mb"):
        summary[key] = {impl: statistics.median(r[key] for r in impl_runs) for impl, impl_runs in runs.items()}
        for other in runs:
            if other != "peftkit":
                ratios = [ours[key] / theirs[key] for ours, theirs in zip(runs["peftkit"], runs[other])]
                summary[key]["ratio" if other == "peft" else f"ratio_to_{other}"] = spread(ratios)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--eval", action="store_true", help="also run each recipe's eval tasks")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="peftkit-pipeline-") as tmp:
        for recipe in args.recipes:
            impls = IMPLS + tuple(VARIANTS.get(recipe, {}))
            runs = {impl: [] for impl in impls}
            for rep in range(args.reps):
                order = impls if rep % 2 == 0 else impls[::-1]  # ABBA: drift cancels
                for impl in order:
                    figures = run_once(recipe, impl, Path(tmp) / f"{recipe}-{impl}-{rep}", args.eval)
                    runs[impl].append(figures)
                    print(f"  {recipe} {impl:7s} rep {rep}: {figures['tokens_per_s']:7.1f} tok/s  "
                          f"{figures['step_s']:.3f} s/step  peak {figures['peak_rss_mb']:,.0f} MiB "
                          f"(training {figures['train_peak_rss_mb']:,.0f})", flush=True)
            results[recipe] = {"runs": runs, "summary": summarise(runs)}
            s = results[recipe]["summary"]
            print(f"{recipe}: tokens/s peftkit/peft {s['tokens_per_s']['ratio']['median']:.3f} "
                  f"[{s['tokens_per_s']['ratio']['min']:.3f}, {s['tokens_per_s']['ratio']['max']:.3f}]  "
                  f"peak RSS {s['peak_rss_mb']['ratio']['median']:.3f} "
                  f"[{s['peak_rss_mb']['ratio']['min']:.3f}, {s['peak_rss_mb']['ratio']['max']:.3f}]"
                  + "".join(f"  peak vs {k[9:]} {v['median']:.3f}" for k, v in s["peak_rss_mb"].items()
                            if k.startswith("ratio_to_")), flush=True)
    path = write_record("pipeline", {"args": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
