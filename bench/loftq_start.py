"""LoftQ's starting error against plain QLoRA's on SmolLM2-135M (fp32): how far the 4-bit base
plus the fresh adapter is from the full-precision model, in weights (relative Frobenius error
over all adapted layers) and in logits (mean and max |difference| on fixed tokens), for the
`qlora-loftq` preset (r 64, all-linear) at 1 and 3 iterations, and at r 16. Writes
bench/results/loftq_start.json.

    python bench/loftq_start.py
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import peftkit  # noqa: E402
from peftkit.methods.lora import LoRALinear  # noqa: E402
from peftkit.nf4 import Linear4bit  # noqa: E402
from tests.conftest import token_batch  # noqa: E402


def load() -> torch.nn.Module:
    return peftkit.load_model("smollm2-135m", dtype="fp32", device="cpu")[0]


@torch.no_grad()
def measure(full: torch.nn.Module, x: torch.Tensor, **overrides) -> dict:
    model = peftkit.apply_adapter(load(), "qlora-loftq", dropout=0.0, **overrides)
    originals = dict(full.named_modules())
    error = norm = 0.0
    for name, layer in model.named_modules():
        if isinstance(layer, LoRALinear) and isinstance(layer.base, Linear4bit):
            weight = originals[name].weight.float()
            start = layer.base.dequantized_weight().float() + layer.delta_weight().float()
            error += (weight - start).pow(2).sum().item()
            norm += weight.pow(2).sum().item()
    diff = (model(x).logits - full(x).logits).abs()
    return {"weight_relative_error": (error / norm) ** 0.5, "logits_mean_abs": diff.mean().item(),
            "logits_max_abs": diff.max().item()}


def main() -> None:
    full = load()
    x = token_batch(full.config.vocab_size, batch=2, length=64)
    results = {}
    for label, overrides in {"qlora r64": {"init": "default"}, "loftq r64 iter1": {},
                             "loftq r64 iter3": {"loftq_iter": 3}, "qlora r16": {"init": "default", "r": 16},
                             "loftq r16 iter1": {"r": 16}}.items():
        results[label] = measure(full, x, **overrides)
        print(label, json.dumps({k: f"{v:.4g}" for k, v in results[label].items()}), flush=True)
    out = Path(__file__).parent / "results" / "loftq_start.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
