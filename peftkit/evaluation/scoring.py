"""Log-likelihood scoring, batched: candidate continuations (classification) and completion loss.

Chat prompts of one task share a long start (system prompt, in-context examples, instruction).
That shared prefix runs through the model once; its key/value cache is then repeated over each
batch, and only the rest of every sequence is computed. With 4-shot SST-2 this skips most of
the work; the scores equal a full forward pass up to float rounding (tested).

Candidate scoring asks the model only for the logits it needs (`logits_to_keep`): when every
candidate is a single token, one pass over the prompt scores all candidates at once.
"""

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from peftkit.evaluation.batches import pad, sorted_batches
from peftkit.evaluation.prompts import IGNORE_INDEX
from peftkit.methods.prefix import cache_kwarg

MIN_SHARED = 8  # a shorter shared prefix is not worth its own forward pass


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the token prefix all sequences share, leaving at least one token of each."""
    length = min(len(s) for s in sequences) - 1
    first = sequences[0]
    for seq in sequences[1:]:
        i = 0
        while i < length and seq[i] == first[i]:
            i += 1
        length = i
    return max(length, 0)


class SharedPrefix:
    """The key/value cache of a prefix, computed once, and a forward pass that reuses it.

    Args:
        model: a causal LM.
        sequences: all sequences of the task; their common prefix (if at least `MIN_SHARED`
            tokens, else none) is computed now.
        longest: the prefix stops here, so the positions the caller scores stay outside it.
        use: False computes every sequence in full (for comparisons).
    """

    def __init__(self, model: nn.Module, sequences: Sequence[Sequence[int]], longest: int,
                 use: bool = True) -> None:
        # peft's prompt learning injects its own cache, which a shared prefix cache would replace
        use = use and not getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
        self.length = min(shared_prefix_length(sequences), longest) if use and sequences else 0
        self.cache, self.last_logits = None, None
        if self.length < MIN_SHARED:
            self.length = 0
            return
        self.cache_kwarg = cache_kwarg(model)
        ids = torch.tensor([list(sequences[0][:self.length])], device=_device(model))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(
            self.length, device=ids.device)[None], use_cache=True, logits_to_keep=1)
        self.cache = out.cache if hasattr(out, "cache") else out.past_key_values
        self.last_logits = out.logits[:, -1:]  # (1, 1, vocab): predicts the first token after the prefix

    def forward(self, model: nn.Module, rows: Sequence[Sequence[int]], pad_id: int, side: str = "left",
                logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (batch, kept columns, vocab) for the part of each row after the prefix."""
        ids, mask, positions = pad([row[self.length:] for row in rows], pad_id, _device(model), side)
        kwargs = {}
        if self.cache is not None:
            cache = copy.deepcopy(self.cache)  # the forward pass appends to it
            cache.batch_repeat_interleave(len(rows))
            mask = torch.cat([mask.new_ones(len(rows), self.length), mask], dim=1)
            positions = positions + self.length
            kwargs = {self.cache_kwarg: cache}
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=self.cache is not None,
                     logits_to_keep=logits_to_keep, **kwargs).logits


@torch.inference_mode()
def score_candidates(model: nn.Module, prompts: Sequence[list[int]], candidates: Sequence[list[int]],
                     pad_id: int, batch_size: int = 8, desc: str | None = None, progress: bool = True,
                     share_prefix: bool = True) -> torch.Tensor:
    """Summed log-probabilities of each candidate continuation after each prompt.

    Args:
        model: a causal LM.
        prompts: token ids of each prompt.
        candidates: token ids of each candidate continuation (the same for every prompt).
        pad_id: the padding token id.
        batch_size: sequences per forward pass.
        desc, progress: the progress bar's label, and whether to show it.
        share_prefix: compute the prompts' common prefix once (see the module docstring).

    Returns:
        (len(prompts), len(candidates)) float64 log-probabilities.
    """
    single = all(len(c) == 1 for c in candidates)
    # (prompt, candidate) pairs: one sequence per prompt when one next-token distribution suffices
    sequences = list(prompts) if single else [list(p) + list(c) for p in prompts for c in candidates]
    width = 1 if single else max(len(c) for c in candidates)
    # the last prompt token must stay outside the prefix: it predicts the first candidate token
    prefix = SharedPrefix(model, sequences, min(len(p) for p in prompts) - 1, share_prefix)
    scores = torch.empty(len(prompts), len(candidates), dtype=torch.float64)
    pair_scores = torch.empty(len(sequences), dtype=torch.float64)  # used when candidates are longer
    for _, idx in sorted_batches(sequences, batch_size, desc, progress):
        logits = prefix.forward(model, [sequences[i] for i in idx], pad_id, "left", width + (not single))
        logprobs = torch.log_softmax(logits.float(), dim=-1).double().cpu()  # (batch, kept, vocab)
        for row, i in enumerate(idx):
            if single:
                scores[i] = logprobs[row, -1, [c[0] for c in candidates]]
                continue
            cand = candidates[i % len(candidates)]
            # token t of the candidate sits in column -(len - t) and is predicted one column earlier
            local = torch.arange(len(cand)) + width - len(cand)
            pair_scores[i] = logprobs[row, local, torch.tensor(cand)].sum()
    return scores if single else pair_scores.view(len(prompts), len(candidates))


@torch.inference_mode()
def completion_loss(model: nn.Module, examples: Sequence[tuple[list[int], list[int]]], pad_id: int,
                    batch_size: int = 8, desc: str | None = None, progress: bool = True,
                    share_prefix: bool = True, per_example: list | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) over labelled tokens, and how many tokens that is.

    Args:
        model: a causal LM.
        examples: (input_ids, labels) pairs; labels equal to `IGNORE_INDEX` are not scored.
        pad_id: the padding token id.
        batch_size, desc, progress, share_prefix: as in `score_candidates`.
        per_example: a list to fill with each example's (nats, tokens), in the examples' order.

    Returns:
        (total negative log-likelihood, number of scored tokens); their ratio is the mean loss.
    """
    total, count = 0.0, 0
    # the prefix ends at or before the first scored token (it can still predict that one)
    first_scored = min(next((j for j, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
                       for _, labels in examples)
    prefix = SharedPrefix(model, [ids for ids, _ in examples], first_scored, share_prefix)
    start = prefix.length
    device = _device(model)
    for _, idx in sorted_batches([ids for ids, _ in examples], batch_size, desc, progress):
        logits = prefix.forward(model, [examples[i][0] for i in idx], pad_id, "right").float()
        labels, _, _ = pad([examples[i][1][start:] for i in idx], IGNORE_INDEX, device, "right")
        if start:  # the prefix's last position predicts the first label here
            logits = torch.cat([prefix.last_logits.float().expand(len(idx), -1, -1), logits[:, :-1]], dim=1)
        else:  # position j predicts token j + 1
            logits, labels = logits[:, :-1], labels[:, 1:]
        targets = labels.reshape(-1)
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, ignore_index=IGNORE_INDEX,
                                 reduction="none")
        total += losses.sum().item()
        count += int((targets != IGNORE_INDEX).sum())
        if per_example is not None:
            rows, tokens = losses.view(len(idx), -1).sum(dim=1).tolist(), (labels != IGNORE_INDEX).sum(dim=1).tolist()
            per_example.extend(zip(idx, rows, tokens))
    if per_example is not None:
        per_example.sort(key=lambda item: item[0])
        per_example[:] = [(nats, tokens) for _, nats, tokens in per_example]
    return total, count
