"""Prefix-tuning and prompt tuning speed: peftkit vs peft train steps, and generation with a
prefix vs the base model, measured as ratios in one run.

    python bench/prefix.py [--model smollm2-135m] [--reps 5] [--batch 4] [--seq 128] [--new-tokens 64]

Train step = forward + backward + AdamW on a batch of 4 x 128 tokens, fp32, CPU, 20 virtual
tokens, from the same initial weights on both sides. Generation is greedy, batch 1, a 32-token
prompt; peft's own generate is not timed, because peft 0.21 under transformers 5.x drops the
prefix in generate (it passes `past_key_values` beside generate's `cache`, which wins).
"""

import os
import sys
from collections.abc import Callable

import torch
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peftkit  # noqa: E402
from bench.common import bench_args, interleaved, train_step, write_record  # noqa: E402

VIRTUAL_TOKENS = 20
CONFIGS = {  # tag: (peftkit method, peftkit overrides, peft config)
    "prefix": ("prefix", {}, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)),
    "prefix-mlp": ("prefix", {"prefix_projection": True}, PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS, prefix_projection=True)),
    "prompt": ("prompt", {"init": "random"}, PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS)),
}


def load(name: str) -> torch.nn.Module:
    return peftkit.load_model(name, dtype="fp32", device="cpu")[0]


def generation(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    model.eval()

    @torch.no_grad()
    def run() -> None:
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
    return run


def pair(name: str, tag: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """peftkit's and peft's model for one config, ours starting from peft's initial weights."""
    method, overrides, peft_config = CONFIGS[tag]
    theirs = get_peft_model(load(name), peft_config)
    ours = peftkit.apply_adapter(load(name), method, num_virtual_tokens=VIRTUAL_TOKENS, **overrides)
    adapter = getattr(ours, "peftkit_prefix", None) or ours.peftkit_prompt
    adapter.load_state_dict(theirs.prompt_encoder.default.state_dict())
    return ours, theirs


def main() -> None:
    args = bench_args(__doc__, seq=128, new_tokens=64)
    torch.manual_seed(0)
    vocab = load(args.model).config.vocab_size
    batch = torch.randint(3, vocab, (args.batch, args.seq))

    cases = {}
    for tag in CONFIGS:
        ours, theirs = pair(args.model, tag)
        cases[f"peftkit {tag}"] = train_step(ours, batch)
        cases[f"peft {tag}"] = train_step(theirs, batch)
    step = interleaved(cases, reps=args.reps)

    prompt = torch.randint(3, vocab, (1, 32))
    gen_cases = {"base": generation(load(args.model), prompt, args.new_tokens)}
    for tag in ("prefix", "prompt"):
        gen_cases[f"peftkit {tag}"] = generation(pair(args.model, tag)[0], prompt, args.new_tokens)
    gen = {name: args.new_tokens / s for name, s in interleaved(gen_cases, reps=args.reps).items()}

    print(f"train step, {args.model}, fp32 CPU, batch {args.batch} x {args.seq}, {VIRTUAL_TOKENS} virtual tokens, "
          f"median of {args.reps}")
    ratios = {}
    for tag in CONFIGS:
        o, p = step[f"peftkit {tag}"], step[f"peft {tag}"]
        ratios[tag] = {"peftkit_over_peft": o / p}
        print(f"  {tag:10s} peftkit {o:.3f} s  peft {p:.3f} s  peftkit/peft {o / p:.3f}")
    print(f"greedy generation, batch 1, 32-token prompt, {args.new_tokens} new tokens (tokens/s)")
    for name, tps in gen.items():
        print(f"  {name:15s} {tps:7.1f}  (adapter/base tokens/s {tps / gen['base']:.3f})")
    path = write_record("prefix", {"args": vars(args), "virtual_tokens": VIRTUAL_TOKENS, "step_seconds": step,
                                   "ratios": ratios, "generation_tokens_per_s": gen,
                                   "generation_over_base": {k: v / gen["base"] for k, v in gen.items()}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
