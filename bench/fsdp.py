"""Sharded training against one process and data parallel: equality and memory per process.

    python bench/fsdp.py [--model smollm2-135m] [--steps 4] [--methods lora,qlora]

For each method (tiny-llama is `--model tiny-llama`), `peftkit train` runs the same recipe
(Alpaca, max_length 256, `--steps` steps at a global batch of 4, seed 42, dropout 0, fp32) as:
  one    1 process, batch 4
  ddp    2 processes (gloo), batch 2 each: the whole model in each
  fsdp   2 processes (gloo), batch 2 each, train.distributed: fsdp (FSDP2; the 4-bit base sharded too)
and records each run's system.json memory (peak RSS while training and bytes of parameters and
buffers held, per process; for QLoRA the 4-bit base's too), training time, and the max |difference|
of its saved adapter from the one-process run's. Writes bench/results/fsdp.json.
Note: CPU processes each load the whole model before sharding it, so their peak RSS includes
what loading leaves in the allocator; the bytes held are what sharding saves.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bench.common import write_record  # noqa: E402
from peftkit.data import data_root  # noqa: E402

LAYOUTS = {"one": [], "ddp": ["train.batch_size=2", "--nproc", "2"],
           "fsdp": ["train.batch_size=2", "train.distributed=fsdp", "--nproc", "2"]}


def run(recipe: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "peftkit", "train", str(recipe), f"output={out}", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return json.loads((out / "system.json").read_text())


def max_diff(a: Path, b: Path) -> float:
    x, y = (load_file(run / "adapter" / "adapter_model.safetensors") for run in (a, b))
    return max((x[k] - y[k]).abs().max().item() for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--methods", default="lora,qlora")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            recipe = Path(tmp) / f"{method}.yaml"
            recipe.write_text(yaml.safe_dump({
                "model": args.model, "adapter": method, "adapter_overrides": {"dropout": 0.0},
                "data": {"train": str(data_root() / "alpaca" / "alpaca_5000.json"), "format": "alpaca",
                         "max_length": 256, "limit": 64},
                "train": {"max_steps": args.steps, "batch_size": 4, "lr": 1e-3, "logging_steps": 1,
                          "save_steps": args.steps, "seed": 42, "precision": "fp32"}}))
            for layout, extra in LAYOUTS.items():
                out = Path(tmp) / f"{method}-{layout}"
                system = run(recipe, out, extra)
                row = {"method": method, "layout": layout, "processes": system["world_size"],
                       "peak_memory_mb_per_process": system["peak_memory_mb_per_process"],
                       "model_mb_per_process": [round(b / 2**20, 1) for b in system["model_bytes_per_process"]],
                       "quantized_base_mb_per_process": [round(b / 2**20, 1) for b in
                                                         system.get("quantized_base_bytes_per_process", [])],
                       "train_time_s": system["train_time_s"],
                       "max_diff_vs_one": max_diff(Path(tmp) / f"{method}-one", out)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_record("fsdp", {"model": args.model, "steps": args.steps, "global_batch": 4, "rows": rows})


if __name__ == "__main__":
    main()
