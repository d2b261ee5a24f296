"""Batched generation: left padding, the KV cache, greedy or seeded sampling.

Each batch samples under its own seed (`settings.seed + batch number`) inside a forked RNG, so a
rerun with the same settings and batch size gives the same text, whatever ran before, and the
caller's global RNG is left as it was.
"""

import contextlib
from collections.abc import Sequence

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedTokenizerBase

from peftkit.evaluation.batches import pad, sorted_batches
from peftkit.evaluation.prompts import pad_id
from peftkit.evaluation.spec import GenerationSettings


def stop_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos and the model's configured eos ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def hf_generation_config(settings: GenerationSettings, pad: int, stops: list[int]) -> GenerationConfig:
    """A transformers `GenerationConfig` holding exactly our settings, not the model's defaults."""
    sampling = {}
    if not settings.greedy:
        sampling = {"temperature": float(settings.temperature), "top_k": settings.top_k, "top_p": settings.top_p}
    return GenerationConfig(max_new_tokens=settings.max_new_tokens, do_sample=not settings.greedy, num_beams=1,
                            use_cache=True, pad_token_id=pad, eos_token_id=stops,
                            **{k: v for k, v in sampling.items() if v is not None})


class GenerationUnsupported(Exception):
    """This model cannot generate faithfully, or is not the kind a task scores; the task is
    skipped with this reason."""


def refuse_peft_prefix(model: nn.Module) -> None:
    """peft's prefix-tuning `generate` builds the prefix only when no cache is passed in, and
    transformers 5 always passes one: the output is the base model's, not the adapter's."""
    config = getattr(model, "active_peft_config", None)
    if str(getattr(config, "peft_type", "")).endswith("PREFIX_TUNING"):
        raise GenerationUnsupported("peft's generate() drops prefix-tuning's virtual tokens with transformers 5 "
                                    "(it would score the base model); the peftkit run of this method generates "
                                    "with them")


def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
             settings: GenerationSettings, batch_size: int = 8, desc: str | None = None,
             progress: bool = True, merge: bool = True) -> list[str]:
    """Generate a completion for each prompt and decode it.

    A mergeable peftkit adapter (the LoRA family) generates through merged weights, which are
    restored bit for bit afterwards (`peftkit.api.merged_for_inference`).

    Args:
        model: a causal LM (prompts left-padded, the new tokens follow them), or an encoder-decoder
            (sources right-padded into the encoder, the decoder's output is all new).
        tokenizer: its tokenizer; special tokens are dropped from the decoded text.
        prompts: token ids of each prompt (e.g. from `prompts.prompt_ids`).
        settings: greedy or sampling, lengths and seed.
        batch_size: prompts per `generate` call.
        desc, progress: the progress bar's label, and whether to show it.
        merge: generate through merged weights where the adapter can merge.

    Returns:
        The decoded new text of each prompt, stripped, in the order of `prompts`.
    """
    from peftkit.api import merged_for_inference

    refuse_peft_prefix(model)
    with merged_for_inference(model) if merge else contextlib.nullcontext():
        return _generate(model, tokenizer, prompts, settings, batch_size, desc, progress)


@torch.inference_mode()
def _generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
              settings: GenerationSettings, batch_size: int, desc: str | None, progress: bool) -> list[str]:
    device = next(model.parameters()).device
    padding = pad_id(tokenizer)
    config = hf_generation_config(settings, padding, stop_ids(model, tokenizer))
    devices = [device] if device.type == "cuda" else []
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    texts: list[str] = [""] * len(prompts)
    for number, idx in sorted_batches(prompts, batch_size, desc, progress):
        ids, mask, _ = pad([prompts[i] for i in idx], padding, device, side="right" if encoder_decoder else "left")
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(settings.seed + number)
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        new = tokenizer.batch_decode(output if encoder_decoder else output[:, ids.shape[1]:], skip_special_tokens=True)
        for i, text in zip(idx, new):
            texts[i] = text.strip()
    return texts
