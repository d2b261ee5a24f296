"""LoRA train step and generation speed: peftkit vs peft, measured as ratios in one run.

    python bench/lora_step.py [--model smollm2-135m] [--reps 5] [--batch 4] [--seq 256]

Train step = forward + backward + AdamW on a batch of 4 x 256 tokens, fp32, CPU. The floor
is forward + backward of the frozen model with only the embeddings' output requiring grad:
the least any adapter touching every layer can cost. Generation is greedy, batch 1.

Completion-only batches (`--completion 0.25`: the last quarter of each row has labels, the prompt
is masked with -100, as in instruction data): peftkit's loss on labelled positions only
(`peftkit.lm_loss.labelled_loss`, what `peftkit train` runs) vs peft's model called with the
labels (transformers' loss over every position's logits), both on LoRA r16 all-linear.
"""

import os
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import peftkit  # noqa: E402
from bench.common import bench_args, interleaved, train_step, write_record  # noqa: E402
from peftkit.protocol import adapter_parameters  # noqa: E402

CONFIGS = {
    "r8-qv": ({"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
              {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}),
    "r16-all": ({"r": 16, "alpha": 32, "target_modules": "all-linear"},
                {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}),
}


def load(name):
    return peftkit.load_model(name, dtype="fp32", device="cpu")[0]


def ours(name, kw):
    model = peftkit.apply_adapter(load(name), "lora", dropout=0.0, **kw)
    with torch.no_grad():
        for key, p in adapter_parameters(model).items():
            p.normal_(std=0.02)  # a trained-looking adapter, B non-zero
    return model


def theirs(name, kw):
    return get_peft_model(load(name), LoraConfig(lora_dropout=0.0, task_type="CAUSAL_LM", **kw))


def floor_model(name):
    model = load(name)
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    return model


def generation(model, prompt, new_tokens):
    model.eval()

    @torch.no_grad()
    def run():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False)
    return run


def main() -> None:
    args = bench_args(__doc__, seq=256, new_tokens=64, completion=0.25)
    torch.manual_seed(0)
    vocab = load(args.model).config.vocab_size
    batch = torch.randint(3, vocab, (args.batch, args.seq))
    labels = batch.clone()
    labels[:, : args.seq - round(args.completion * args.seq)] = -100  # (batch, seq): the prompt is masked

    cases = {"floor": train_step(floor_model(args.model), batch)}
    for tag, (ours_kw, peft_kw) in CONFIGS.items():
        cases[f"peftkit {tag}"] = train_step(ours(args.model, ours_kw), batch)
        cases[f"peft {tag}"] = train_step(theirs(args.model, peft_kw), batch)
    ours_kw, peft_kw = CONFIGS["r16-all"]
    cases["peftkit completion"] = train_step(ours(args.model, ours_kw), batch, labels, labels_only=True)
    cases["peft completion"] = train_step(theirs(args.model, peft_kw), batch, labels, labels_only=False)
    step = interleaved(cases, reps=args.reps)

    prompt = torch.randint(3, vocab, (1, 32))
    lora_ours = ours(args.model, CONFIGS["r8-qv"][0])
    merged = peftkit.merge_adapter(ours(args.model, CONFIGS["r8-qv"][0]), unload=True)
    gen_cases = {"base": generation(load(args.model), prompt, args.new_tokens),
                 "peftkit unmerged": generation(lora_ours, prompt, args.new_tokens),
                 "peftkit merged": generation(merged, prompt, args.new_tokens),
                 "peft unmerged": generation(theirs(args.model, CONFIGS["r8-qv"][1]), prompt, args.new_tokens)}
    gen = {name: args.new_tokens / s for name, s in interleaved(gen_cases, reps=args.reps).items()}

    print(f"train step, {args.model}, fp32 CPU, batch {args.batch} x {args.seq}, median of {args.reps}")
    print(f"  floor (frozen base, forward + backward): {step['floor']:.3f} s")
    ratios = {}
    for tag in CONFIGS:
        o, p = step[f"peftkit {tag}"], step[f"peft {tag}"]
        ratios[tag] = {"peftkit_over_peft": o / p, "peftkit_over_floor": o / step["floor"],
                       "peft_over_floor": p / step["floor"]}
        print(f"  LoRA {tag:8s} peftkit {o:.3f} s  peft {p:.3f} s  peftkit/peft {o / p:.3f}  "
              f"peftkit/floor {o / step['floor']:.3f}  peft/floor {p / step['floor']:.3f}")
    o, p = step["peftkit completion"], step["peft completion"]
    ratios["completion r16-all"] = {"peftkit_over_peft": o / p}
    print(f"  completion-only ({args.completion:.0%} labelled) r16-all: peftkit {o:.3f} s  peft {p:.3f} s  "
          f"peftkit/peft {o / p:.3f}")
    print(f"greedy generation, batch 1, {args.new_tokens} new tokens (tokens/s)")
    for name, tps in gen.items():
        print(f"  {name:17s} {tps:7.1f}  ({gen['base'] / tps - 1:+.1%} time vs base)")
    path = write_record("lora_step", {"args": vars(args), "step_seconds": step, "ratios": ratios,
                                      "generation_tokens_per_s": gen,
                                      "unmerged_overhead": gen["base"] / gen["peftkit unmerged"] - 1})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
