"""The `peftkit train` pipeline end to end: impl=peftkit vs impl=peft on shipped smoke recipes.

    python bench/pipeline.py [--recipes lora-sst2-smoke ...] [--reps 3] [--eval]

Each run is its own `peftkit train` process (a fresh interpreter, so no allocator or thread
state leaks between runs); the two impls alternate in ABBA order, so drift on a shared
machine hits both alike. Per run it reads the run's system.json (training tokens/s, training
seconds / steps) and the process's peak RSS from the kernel (`wait4`), which covers loading,
training and (with --eval) the recipe's eval tasks. It reports peftkit / peft ratios: the
median over repetitions of each pair's ratio, with the lowest and highest.

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


def run_once(recipe: str, impl: str, out: Path, with_eval: bool) -> dict:
    """One `peftkit train` process; its figures, or an error naming the log."""
    args = [sys.executable, "-m", "peftkit", "train", recipe, f"impl={impl}", f"output={out}",
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
            "peak_rss_mb": usage.ru_maxrss / 1024, "wall_s": time.perf_counter() - started,
            "train_tokens": system["train_tokens"]}


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per quantity: each impl's median, and the peftkit / peft ratio of each repetition's pair."""
    pairs = list(zip(runs["peftkit"], runs["peft"]))
    summary = {}
    for key in ("tokens_per_s", "step_s", "peak_rss_mb"):
        summary[key] = {"peftkit": statistics.median(r[key] for r in runs["peftkit"]),
                        "peft": statistics.median(r[key] for r in runs["peft"]),
                        "ratio": spread([ours[key] / theirs[key] for ours, theirs in pairs])}
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
            runs = {impl: [] for impl in IMPLS}
            for rep in range(args.reps):
                order = IMPLS if rep % 2 == 0 else IMPLS[::-1]  # ABBA: drift cancels
                for impl in order:
                    figures = run_once(recipe, impl, Path(tmp) / f"{recipe}-{impl}-{rep}", args.eval)
                    runs[impl].append(figures)
                    print(f"  {recipe} {impl:7s} rep {rep}: {figures['tokens_per_s']:7.1f} tok/s  "
                          f"{figures['step_s']:.3f} s/step  peak {figures['peak_rss_mb']:,.0f} MiB", flush=True)
            results[recipe] = {"runs": runs, "summary": summarise(runs)}
            s = results[recipe]["summary"]
            print(f"{recipe}: tokens/s peftkit/peft {s['tokens_per_s']['ratio']['median']:.3f} "
                  f"[{s['tokens_per_s']['ratio']['min']:.3f}, {s['tokens_per_s']['ratio']['max']:.3f}]  "
                  f"peak RSS {s['peak_rss_mb']['ratio']['median']:.3f} "
                  f"[{s['peak_rss_mb']['ratio']['min']:.3f}, {s['peak_rss_mb']['ratio']['max']:.3f}]", flush=True)
    path = write_record("pipeline", {"args": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
