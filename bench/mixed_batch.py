"""Mixed-adapter batches against one adapter at a time, ours and peft's, in tokens/s.

    python bench/mixed_batch.py [--model smollm2-135m] [--quick] [--reps 3] [--batch 8] [--seq 64] [--new-tokens 32]

One base (fp32, CPU, torch's default threads) carries `--adapters` LoRA adapters (r 8 on q_proj
and v_proj, lora_B drawn N(0, 0.02) so each adapter changes the outputs); the batch's rows are
assigned to them round-robin (`default`, `b`, `c`, `d`, `default`, ...). Cases, taking turns
per repetition (median of `--reps`, after a warm-up that checks the prefill logits and generates
2 tokens; all under torch.inference_mode):
  mixed       one call with `adapter_names` (one name per row);
  sequential  for each adapter, `set_adapter` and a call on its rows only (times summed);
each as a prefill (one forward of the whole prompt; prompt tokens/s) and as greedy generation
of `--new-tokens` tokens (EOS suppressed so every row generates them all; generated tokens/s
over the whole `generate` call). peft runs the same cases on the same adapters, saved with
`save_adapter` (peft's multi-adapter layout) and loaded with `PeftModel.from_pretrained` +
`load_adapter`. The script asserts that the mixed batch's logits equal the one-at-a-time
logits row by row, and ours equal peft's, and records the max |difference|.
`--quick` uses tiny-llama (a tiny random model). Writes bench/results/mixed_batch.json.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402

import peftkit  # noqa: E402
from bench.common import interleaved, write_record  # noqa: E402
from tests.conftest import token_batch  # noqa: E402

NAMES = ["default", "b", "c", "d", "e", "f", "g", "h"]
ADAPTER = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
TOLERANCE = 1e-4  # fp32 logits; different batch sizes may change BLAS blocking, hence not exact


def load(name: str):
    return peftkit.load_model(name, dtype="fp32", device="cpu")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def ours_model(model_name: str, adapters: list[str]):
    model, tok = load(model_name)
    for i, name in enumerate(adapters):
        peftkit.apply_adapter(model, "lora", **({} if i == 0 else {"name": name}), **ADAPTER)
    torch.manual_seed(0)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            if "lora_B" in pname:
                torch.nn.init.normal_(param, std=0.02)
    return model.eval(), tok


def peft_model(model_name: str, directory: Path, adapters: list[str]):
    model = PeftModel.from_pretrained(load(model_name)[0], directory)
    for name in adapters[1:]:
        model.load_adapter(directory / name, adapter_name=name)
    return model.eval()


def cases(model, x, mask, row_names, adapters, select, gen_kwargs):
    """The four timed calls on one model: prefill and generation, mixed and one adapter at a time."""
    groups = {name: [i for i, n in enumerate(row_names) if n == name] for name in adapters}

    def mixed_prefill():
        return model(input_ids=x, attention_mask=mask, adapter_names=row_names).logits

    def sequential_prefill():
        out = {}
        for name, idx in groups.items():
            select(name)
            out[name] = model(input_ids=x[idx], attention_mask=mask[idx]).logits
        return out

    def mixed_generate(**extra):
        return model.generate(input_ids=x, attention_mask=mask, adapter_names=row_names, **gen_kwargs | extra)

    def sequential_generate(**extra):
        out = {}
        for name, idx in groups.items():
            select(name)
            out[name] = model.generate(input_ids=x[idx], attention_mask=mask[idx], **gen_kwargs | extra)
        return out

    return {"prefill_mixed": mixed_prefill, "prefill_sequential": sequential_prefill,
            "generate_mixed": mixed_generate, "generate_sequential": sequential_generate}, groups


def key(label: str, phase: str) -> str:
    """'ours mixed', 'prefill' -> 'ours prefill_mixed' (a case's key in the timings)."""
    side, kind = label.split()
    return f"{side} {phase}_{kind}"


def reassemble(parts: dict[str, torch.Tensor], groups: dict[str, list[int]], like: torch.Tensor) -> torch.Tensor:
    """Per-adapter outputs back in the batch's row order."""
    out = torch.empty_like(like)
    for name, idx in groups.items():
        out[idx] = parts[name]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="tiny-llama instead of --model")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4, choices=range(2, len(NAMES) + 1))
    args = parser.parse_args()
    model_name = "tiny-llama" if args.quick else args.model
    adapters = NAMES[:args.adapters]
    row_names = [adapters[i % len(adapters)] for i in range(args.batch)]

    ours, tok = ours_model(model_name, adapters)
    with tempfile.TemporaryDirectory() as directory:
        peftkit.save_adapter(ours, Path(directory) / "adapters")
        theirs = peft_model(model_name, Path(directory) / "adapters", adapters)

    x = token_batch(ours.config.vocab_size, batch=args.batch, length=args.seq)
    mask = torch.ones_like(x)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    gen_kwargs = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
                  "pad_token_id": pad}

    ours_cases, groups = cases(ours, x, mask, row_names, adapters, lambda n: peftkit.set_adapter(ours, n), gen_kwargs)
    peft_cases, _ = cases(theirs, x, mask, row_names, adapters, theirs.set_adapter, gen_kwargs)

    timed = {f"{side} {case}": fn for side, side_cases in (("ours", ours_cases), ("peft", peft_cases))
             for case, fn in side_cases.items()}
    with torch.inference_mode():
        # the warm-up: every prefill case in full (its logits checked), every generate case for 2 tokens
        outputs = {case: fn() if "prefill" in case else fn(max_new_tokens=2, min_new_tokens=2)
                   for case, fn in timed.items()}
        mixed = outputs["ours prefill_mixed"]
        checks = {
            "ours_mixed_vs_ours_sequential": max_diff(mixed, reassemble(outputs["ours prefill_sequential"], groups,
                                                                        mixed)),
            "ours_mixed_vs_peft_mixed": max_diff(mixed, outputs["peft prefill_mixed"]),
            "peft_mixed_vs_peft_sequential": max_diff(outputs["peft prefill_mixed"], reassemble(
                outputs["peft prefill_sequential"], groups, mixed)),
        }
        with peftkit.disable_adapter(ours):
            checks["adapters_change_logits_by"] = max_diff(mixed, ours(input_ids=x).logits)
        for check in ("ours_mixed_vs_ours_sequential", "ours_mixed_vs_peft_mixed", "peft_mixed_vs_peft_sequential"):
            assert checks[check] <= TOLERANCE, f"{check}: max |logits diff| {checks[check]:.3e} > {TOLERANCE}"
        assert checks["adapters_change_logits_by"] > 100 * TOLERANCE, "the adapters do not change the logits"
        print(f"checked: {json.dumps({k: f'{v:.2e}' for k, v in checks.items()})}", flush=True)

        samples = {case: [] for case in timed}  # the cases take turns, so drift hits them all alike
        for rep in range(args.reps):
            for case, fn in timed.items():
                start = time.perf_counter()
                outputs[case] = fn()
                samples[case].append(time.perf_counter() - start)
            print(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in samples.items()),
                  flush=True)
        seconds = {case: statistics.median(values) for case, values in samples.items()}
        generated = outputs["ours generate_mixed"]
        token_agreement = {
            "ours_mixed_vs_ours_sequential": (generated == reassemble(outputs["ours generate_sequential"], groups,
                                                                      generated)).float().mean().item(),
            "ours_mixed_vs_peft_mixed": (generated == outputs["peft generate_mixed"]).float().mean().item(),
        }
        switching = interleaved({"ours": lambda: [peftkit.set_adapter(ours, n) for n in adapters],
                                 "peft": lambda: [theirs.set_adapter(n) for n in adapters]}, reps=5)

    prompt_tokens, new_tokens = args.batch * args.seq, args.batch * args.new_tokens
    tokens_per_s = {k: (prompt_tokens if "prefill" in k else new_tokens) / v for k, v in seconds.items()}
    pairs = (("ours mixed", "ours sequential"), ("ours mixed", "peft mixed"),
             ("ours sequential", "peft sequential"), ("peft mixed", "peft sequential"))
    ratios = {f"{phase}: {a} / {b}": tokens_per_s[key(a, phase)] / tokens_per_s[key(b, phase)]
              for phase in ("prefill", "generate") for a, b in pairs}

    print(f"{model_name} fp32 CPU ({torch.get_num_threads()} threads): {len(adapters)} LoRA adapters "
          f"(r 8, q_proj,v_proj), batch {args.batch} x {args.seq}, {args.new_tokens} new tokens, rows round-robin, "
          f"median of {args.reps}")
    print(f"  {'case':<28}{'seconds':>10}{'tokens/s':>12}")
    for case, value in seconds.items():
        print(f"  {case:<28}{value:>10.3f}{tokens_per_s[case]:>12.1f}")
    print(f"  set_adapter x{len(adapters)}: ours {switching['ours'] * 1e3:.2f} ms, "
          f"peft {switching['peft'] * 1e3:.2f} ms (inside the sequential times)")
    print("  tokens/s ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    print("  max |logits diff|: " + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()))
    print("  greedy tokens equal: " + ", ".join(f"{k} {v:.3f}" for k, v in token_agreement.items()))

    path = write_record("mixed_batch", {
        "args": vars(args), "model": model_name, "dtype": "fp32", "device": "cpu", "peftkit": peftkit.__version__,
        "adapters": {"names": adapters, **ADAPTER, "lora_B_init": "normal std 0.02"},
        "shape": {"batch": args.batch, "seq": args.seq, "new_tokens": args.new_tokens, "row_adapters": row_names,
                  "prompt_tokens": prompt_tokens, "generated_tokens": new_tokens},
        "seconds": seconds, "samples_s": samples, "tokens_per_s": tokens_per_s, "set_adapter_all_s": switching,
        "tokens_per_s_note": "prefill: prompt tokens / forward time; generate: new tokens / whole generate time",
        "ratios_tokens_per_s": ratios, "logits_max_abs_diff": checks, "tolerance": TOLERANCE,
        "greedy_token_agreement": token_agreement})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
