"""Batched logits of a sequence-classification head: bare texts with the tokenizer's own special
tokens, right padding with the attention mask (a decoder's `score` head reads the last real token,
which transformers finds from the pad id)."""

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.evaluation.batches import pad, sorted_batches
from peftkit.evaluation.prompts import pad_id


@torch.inference_mode()
def classify(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 16,
             desc: str | None = None, progress: bool = True, max_length: int = 512) -> torch.Tensor:
    """(len(texts), num_labels) float32 logits, in the order of `texts`; each text cut to `max_length` tokens."""
    device = next(model.parameters()).device
    ids = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in texts]
    padding = pad_id(tokenizer)
    rows: list[torch.Tensor | None] = [None] * len(ids)
    for _, idx in sorted_batches(ids, batch_size, desc, progress):
        input_ids, mask, _ = pad([ids[i] for i in idx], padding, device, side="right")
        logits = model(input_ids=input_ids, attention_mask=mask).logits.float().cpu()
        for i, row in zip(idx, logits):
            rows[i] = row
    return torch.stack(rows) if rows else torch.zeros((0, 2))
