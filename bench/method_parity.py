"""Parity figures of every method beyond LoRA against the installed peft, as the tests check them,
with the measured values rather than pass/fail: tiny-llama logits both ways, the 20-step loss
curves, trainable counts, and on SmolLM2-135M (fp32) our saved adapter in peft against peft's
own merge error on the same adapter. Writes bench/results/method_parity.json.

    python bench/method_parity.py [--no-real]
"""

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

import peftkit  # noqa: E402
from peftkit.methods import METHODS  # noqa: E402
from tests.conftest import randomize_adapter, token_batch, train_losses  # noqa: E402
from tests.test_methods import CASES, SCHEDULED, peft_counts, theirs  # noqa: E402


def load(name: str) -> torch.nn.Module:
    return peftkit.load_model(name, dtype="fp32", device="cpu")[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def logits(model, x):
    return model(x).logits


def tiny(case: str, tmp: Path) -> dict:
    overrides = CASES[case][0]
    torch.manual_seed(0)
    model = peftkit.apply_adapter(load("tiny-llama"), case, **overrides)
    randomize_adapter(model)
    x = token_batch(model.config.vocab_size)
    ours_to_peft = max_diff(logits(model, x), logits(PeftModel.from_pretrained(load("tiny-llama"),
                                                                               peftkit.save_adapter(model, tmp / "o")), x))
    torch.manual_seed(0)
    peft_model = theirs(case, **CASES[case][2])
    peft_model.save_pretrained(tmp / "t")
    peft_to_ours = max_diff(logits(peftkit.load_adapter(load("tiny-llama"), tmp / "t"), x), logits(peft_model, x))
    trained = peftkit.apply_adapter(load("tiny-llama"), case, **overrides)
    randomize_adapter(trained)
    reference = PeftModel.from_pretrained(load("tiny-llama"), peftkit.save_adapter(trained, tmp / "i"),
                                          is_trainable=True)
    lr = CASES[case][3]
    if case in SCHEDULED:
        method = METHODS[case]
        allocator = method.allocator(trained)
        mine = train_losses(trained, lr=lr, loss_term=method.regularization, after_step=allocator.update_and_allocate)
        curve = train_losses(reference, lr=lr, after_step=reference.base_model.update_and_allocate)
    else:
        mine, curve = train_losses(trained, lr=lr), train_losses(reference, lr=lr)
    return {"ours_to_peft": ours_to_peft, "peft_to_ours": peft_to_ours,
            "loss_curve_max_diff": max(abs(a - b) for a, b in zip(mine, curve)), "loss_first_last": [mine[0], mine[-1]],
            "trainable_tiny": peftkit.trainable_parameters(model)[0],
            "trainable_equal": peftkit.trainable_parameters(model) == peft_counts(theirs(case))}


def real(case: str, tmp: Path) -> dict:
    model = peftkit.apply_adapter(load("smollm2-135m"), case, **CASES[case][0])
    randomize_adapter(model, std=0.02)
    model.eval()
    x = token_batch(model.config.vocab_size, length=32)
    peft_model = PeftModel.from_pretrained(load("smollm2-135m"), peftkit.save_adapter(model, tmp / "r"))
    ours, theirs_ = logits(model, x), logits(peft_model, x)
    merged = logits(peft_model.merge_and_unload(), x)
    return {"real_ours_vs_peft": max_diff(ours, theirs_), "real_peft_merge_error": max_diff(merged, theirs_),
            "trainable_smollm2": peftkit.trainable_parameters(model)[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-real", action="store_true", help="tiny-llama only")
    args = parser.parse_args()
    results = {}
    for case in sorted(CASES):
        with tempfile.TemporaryDirectory() as directory:
            results[case] = tiny(case, Path(directory))
            if not args.no_real:
                results[case] |= real(case, Path(directory))
        print(case, json.dumps({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in results[case].items()}),
              flush=True)
    out = Path(__file__).parent / "results" / "method_parity.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
