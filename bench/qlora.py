"""QLoRA on CPU: peftkit's NF4 vs bitsandbytes, and QLoRA train steps vs peft + bitsandbytes.

    python bench/qlora.py [--model smollm2-135m] [--reps 5] [--batch 4] [--seq 256]

- quantise: all of the model's linear weights (fp32 -> NF4 + double quantisation);
- dequantise: GB/s of fp32 weights produced (what every forward and backward pays);
- train step: forward + backward + AdamW, LoRA r 16 on all linear layers over the 4-bit base;
- weight memory: bytes of the linear weights, 4-bit (all quantisation state counted) vs fp32/bf16.
Everything is a median over interleaved repetitions, reported as peftkit / reference ratios.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peftkit  # noqa: E402
from bench.common import bench_args, interleaved, train_step, write_record  # noqa: E402
from peftkit.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402
from peftkit.peft_backend import apply_peft  # noqa: E402
from peftkit.qlora import weight_memory  # noqa: E402
from peftkit.targets import linear_module_names  # noqa: E402

ADAPTER = {"r": 16, "alpha": 32, "dropout": 0.0}


def main() -> None:
    import bitsandbytes.functional as bnbf

    args = bench_args(__doc__, seq=256)

    base, _ = peftkit.load_model(args.model, dtype="fp32", device="cpu")
    weights = [base.get_submodule(n).weight.data for n in linear_module_names(base)]
    ours_q = [quantize_nf4(w) for w in weights]
    theirs_q = [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4") for w in weights]
    quant = interleaved({
        "peftkit": lambda: [quantize_nf4(w) for w in weights],
        "bitsandbytes": lambda: [bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
                                 for w in weights],
    }, reps=args.reps)
    dequant = interleaved({
        "peftkit": lambda: [dequantize_nf4(p, s) for p, s in ours_q],
        "bitsandbytes": lambda: [bnbf.dequantize_4bit(p, s) for p, s in theirs_q],
    }, reps=args.reps)
    gbytes = sum(w.numel() for w in weights) * 4 / 1e9
    del base, weights, ours_q, theirs_q

    torch.manual_seed(0)
    vocab = peftkit.load_model(args.model)[0].config.vocab_size
    batch = torch.randint(3, vocab, (args.batch, args.seq))
    ours = peftkit.apply_adapter(peftkit.load_model(args.model, dtype="fp32", device="cpu")[0], "qlora", **ADAPTER)
    from peftkit.methods.lora import LoRAConfig

    cfg = LoRAConfig(target_modules="all-linear", quantize="nf4", **ADAPTER)
    theirs = apply_peft(peftkit.load_model(args.model, dtype="fp32", device="cpu")[0], cfg)
    memory = weight_memory(ours)

    steps = interleaved({"peftkit": train_step(ours, batch), "peft + bitsandbytes": train_step(theirs, batch)},
                        reps=args.reps)

    print(f"{args.model}: {memory['layers']} linear layers, {memory['parameters']:,} weights, CPU "
          f"{torch.get_num_threads()} threads, median of {args.reps}")
    print(f"  quantise      peftkit {quant['peftkit']:.3f} s  bitsandbytes {quant['bitsandbytes']:.3f} s  "
          f"ratio {quant['peftkit'] / quant['bitsandbytes']:.2f}")
    print(f"  dequantise    peftkit {gbytes / dequant['peftkit']:.2f} GB/s  bitsandbytes "
          f"{gbytes / dequant['bitsandbytes']:.2f} GB/s  time ratio {dequant['peftkit'] / dequant['bitsandbytes']:.2f}")
    print(f"  train step    peftkit {steps['peftkit']:.3f} s  peft + bitsandbytes {steps['peft + bitsandbytes']:.3f} s"
          f"  ratio {steps['peftkit'] / steps['peft + bitsandbytes']:.3f}  (batch {args.batch} x {args.seq}, "
          f"LoRA r 16 all-linear)")
    fp32, bf16 = memory["parameters"] * 4, memory["parameters"] * 2
    print(f"  weights       NF4 {memory['bytes'] / 2**20:.1f} MiB ({memory['bits_per_parameter']:.4f} bits/param) vs "
          f"fp32 {fp32 / 2**20:.1f} MiB ({memory['bytes'] / fp32:.3f}x), bf16 {bf16 / 2**20:.1f} MiB "
          f"({memory['bytes'] / bf16:.3f}x)")
    path = write_record("qlora", {
        "args": vars(args), "quantise_s": quant, "dequantise_s": dequant,
        "dequantise_gb_per_s": {k: gbytes / v for k, v in dequant.items()}, "train_step_s": steps,
        "ratios": {"quantise": quant["peftkit"] / quant["bitsandbytes"],
                   "dequantise": dequant["peftkit"] / dequant["bitsandbytes"],
                   "train_step": steps["peftkit"] / steps["peft + bitsandbytes"]},
        "weight_memory": memory})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
