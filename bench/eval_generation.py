"""Evaluation generation: peftkit's eval (batched, through merged weights) vs transformers'
`generate` at batch 1 on the same prompts.

    python bench/eval_generation.py [--tasks e2e gsm8k] [--prompts 24] [--batch 8] [--reps 3]

The model is smollm2-135m with a LoRA adapter (the `lora` preset, B drawn non-zero: cost does
not depend on the values). Each task's prompts and generation settings are the ones its eval
builds (captured from the task's own `run`), limited to the first `--prompts`. Cases, taking
turns per repetition:
  peftkit     `peftkit.evaluation.generation.generate` as eval calls it: batches of `--batch`,
              left-padded, through merged weights (restored afterwards)
  hf-batch1   `model.generate` one prompt at a time, the adapter unmerged (as a peft user calls it)
Generated tokens are counted the same way on both sides (each output's text re-tokenised), and
the outputs are compared: greedy text should agree but for rare reassociation ties.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peftkit  # noqa: E402
from bench.common import write_record  # noqa: E402
from peftkit.evaluation import runner  # noqa: E402
from peftkit.evaluation.generation import generate, hf_generation_config, stop_ids  # noqa: E402
from peftkit.evaluation.prompts import pad_id  # noqa: E402
from peftkit.evaluation.tasks import TASKS  # noqa: E402


def task_prompts(model, tokenizer, task: str, n: int):
    """The prompts and generation settings the task's eval would use (its `run`, with `generate` captured)."""
    module = TASKS[task]
    captured = {}

    def capture(model, tokenizer, prompts, settings, *args, **kwargs):
        captured.update(prompts=list(prompts), settings=settings)
        return [""] * len(prompts)

    real, module.generate = module.generate, capture
    try:
        module.run(model, tokenizer, runner.prepare_specs([task])[0], n, False)
    finally:
        module.generate = real
    return captured["prompts"], captured["settings"]


def hf_batch1(model, tokenizer, prompts, settings) -> list[str]:
    config = hf_generation_config(settings, pad_id(tokenizer), stop_ids(model, tokenizer))
    texts = []
    with torch.inference_mode():
        for ids in prompts:
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 generation_config=config)
            texts.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", nargs="+", default=["e2e", "gsm8k"])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = peftkit.load_model(args.model, dtype="fp32", device="cpu")
    peftkit.apply_adapter(model, "lora")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for module in model.modules():
            if isinstance(module, peftkit.LoRALinear):
                module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen) * 0.002)
    model.eval()
    results = {}
    for task in args.tasks:
        prompts, settings = task_prompts(model, tokenizer, task, args.prompts)
        cases = {"peftkit": lambda: generate(model, tokenizer, prompts, settings, args.batch, progress=False),
                 "hf-batch1": lambda: hf_batch1(model, tokenizer, prompts, settings)}
        seconds, texts = {name: [] for name in cases}, {}
        for _ in range(args.reps):
            for name, fn in cases.items():
                start = time.perf_counter()
                texts[name] = fn()
                seconds[name].append(time.perf_counter() - start)
        tokens = {name: sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in out)
                  for name, out in texts.items()}
        rates = {name: tokens[name] / statistics.median(s) for name, s in seconds.items()}
        agree = sum(a == b for a, b in zip(texts["peftkit"], texts["hf-batch1"])) / len(prompts)
        results[task] = {"prompts": len(prompts), "max_new_tokens": settings.max_new_tokens,
                         "generated_tokens": tokens, "seconds": seconds, "tokens_per_s": rates,
                         "speedup": rates["peftkit"] / rates["hf-batch1"], "same_text_fraction": agree}
        print(f"{task}: peftkit {rates['peftkit']:.1f} tok/s, hf batch 1 {rates['hf-batch1']:.1f} tok/s: "
              f"x{results[task]['speedup']:.2f}; same text {agree:.0%}", flush=True)
    path = write_record("eval_generation", {"args": vars(args), "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
