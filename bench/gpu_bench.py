"""GPU step benchmarks in bf16: LoRA and QLoRA, peftkit vs peft (+ bitsandbytes where installed),
and NF4 dequantisation throughput. Run by `bench/gpu.sh`; writes one JSON record.

    python bench/gpu_bench.py [--out bench/results/gpu.json] [--reps 10] [--batch 8] [--seq 512]
    python bench/gpu_bench.py --device cpu --smoke     # checks the script itself, in seconds

The model is SmolLM2-135M's architecture (its config, written out below) with random weights: a
GPU machine has no model hub and carries at most 64 MiB, and step time does not depend on the
weights' values. Cases per repetition take turns, after a warm-up:
  lora        LoRA r16 all-linear over a bf16 base, labels on every position
  completion  the same with the first 3/4 of each row masked (-100): peftkit's loss on labelled
              positions only vs peft's model called with the labels
  qlora       NF4 base (double quant, bf16 compute) + LoRA r16 all-linear: peftkit's NF4 vs
              peft over bitsandbytes' Linear4bit, when bitsandbytes imports
  dequant     NF4 -> bf16 of a 4096 x 4096 weight: GB/s of bf16 written (peftkit, bitsandbytes)
Each case reports median seconds and peak CUDA memory.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peftkit  # noqa: E402
from bench.common import train_step  # noqa: E402
from peftkit.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402

SMOLLM2_135M = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "hidden_act": "silu"}
SMOKE = {**SMOLLM2_135M, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
PEFT_LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def base_model(device: torch.device, directory: str) -> torch.nn.Module:
    """The random-weight base in bf16, loaded from `directory` (saved once, so every case starts equal)."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).to(device)
    model.config.use_cache = False
    return model


def peft_model(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**PEFT_LORA))


def bnb_base(directory: str, device: torch.device):
    """The same weights loaded through bitsandbytes' NF4 (None where it cannot be imported or used)."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        return None
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config, dtype=torch.bfloat16,
                                                 device_map={"": device})
    model.config.use_cache = False
    return model


def measure(cases: dict, reps: int, device: torch.device) -> dict:
    """Median seconds and peak memory (MiB) per case; cases take turns after a warm-up each."""
    seconds, peaks = {name: [] for name in cases}, {}
    for name, fn in cases.items():
        fn()
    for _ in range(reps):
        for name, fn in cases.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
    return {name: {"seconds": statistics.median(s), "peak_mib": peaks.get(name)} for name, s in seconds.items()}


def dequant_cases(device: torch.device, size: int) -> dict:
    weight = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    packed, state = quantize_nf4(weight)
    cases = {"peftkit": lambda: dequantize_nf4(packed, state)}
    try:
        import bitsandbytes.functional as bnbf

        q, q_state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True, blocksize=64)
        cases["bitsandbytes"] = lambda: bnbf.dequantize_4bit(q, q_state)
    except Exception as exc:  # noqa: BLE001 - bitsandbytes absent or without this device: no case for it
        print(f"no bitsandbytes dequantisation case: {type(exc).__name__}: {exc}", flush=True)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu.json"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help="a tiny config and batch: checks the script only")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or pass --device cpu --smoke to check the script")
    config = SMOKE if args.smoke else SMOLLM2_135M
    batch_size, seq = (2, 32) if args.smoke else (args.batch, args.seq)
    torch.manual_seed(0)
    batch = torch.randint(3, config["vocab_size"], (batch_size, seq), device=device)
    completion = batch.clone()
    completion[:, : seq - seq // 4] = -100  # (batch, seq): the prompt's three quarters are masked
    results: dict = {}
    with tempfile.TemporaryDirectory() as directory:
        AutoModelForCausalLM.from_config(LlamaConfig(**config)).save_pretrained(directory)
        ours = peftkit.apply_adapter(base_model(device, directory), "lora", **LORA)
        theirs = peft_model(base_model(device, directory))
        cases = {"peftkit lora": train_step(ours, batch),
                 "peft lora": train_step(theirs, batch),
                 "peftkit completion": train_step(ours, batch, completion, labels_only=True),
                 "peft completion": train_step(theirs, batch, completion, labels_only=False)}
        qlora = peftkit.apply_adapter(base_model(device, directory), "lora", quantize="nf4", **LORA)
        cases["peftkit qlora"] = train_step(qlora, batch, completion, labels_only=True)
        bnb = bnb_base(directory, device) if device.type == "cuda" else None
        if bnb is not None:
            cases["peft+bnb qlora"] = train_step(peft_model(bnb), batch, completion, labels_only=False)
        results["steps"] = measure(cases, 2 if args.smoke else args.reps, device)
        del ours, theirs, qlora, bnb, cases
    size = 256 if args.smoke else 4096
    dequant = measure(dequant_cases(device, size), 2 if args.smoke else 50, device)
    results["dequant_gb_per_s"] = {name: size * size * 2 / r["seconds"] / 1e9 for name, r in dequant.items()}
    steps = results["steps"]
    results["ratios"] = {f"{kind} peftkit/peft": steps[f"peftkit {kind}"]["seconds"] / steps[f"peft {kind}"]["seconds"]
                         for kind in ("lora", "completion")}
    if "peft+bnb qlora" in steps:
        results["ratios"]["qlora peftkit/peft+bnb"] = (steps["peftkit qlora"]["seconds"]
                                                      / steps["peft+bnb qlora"]["seconds"])
    results["machine"] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
                          "torch": torch.__version__, "platform": platform.platform(), "smoke": args.smoke,
                          "batch": [batch_size, seq]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for name, r in steps.items():
        print(f"{name:20s} {r['seconds'] * 1e3:8.1f} ms  peak {r['peak_mib'] or 0:8.0f} MiB")
    print("ratios:", {k: round(v, 3) for k, v in results["ratios"].items()})
    print("NF4 dequant GB/s:", {k: round(v, 1) for k, v in results["dequant_gb_per_s"].items()})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
