"""A causal LM's training loss on the labelled positions only, through the LM head in chunks.

A completion-only batch masks the prompt's labels (-100): on SST-2 about 95 % of the tokens,
on Alpaca about half. The usual loss still projects every position onto the vocabulary
(49,152 columns for SmolLM2, ~21 % of its forward FLOPs) and builds a (tokens, vocab) float32
tensor. Here the backbone's last hidden states are gathered at the positions whose next token
has a label, and the head and the log-softmax run over chunks of those rows only:

    loss = -sum_t log softmax(h_t W^T + b)[y_t] / n_labels,    t over labelled positions

Note: backward recomputes each chunk's logits from the saved (labelled rows, hidden) instead of
keeping them (one more (chunk, H) x (H, V) GEMM per chunk), so no more than one chunk of
logits, CHUNK_ELEMENTS float32 values, is ever alive. trl's fused head does the same in tiles,
but off CUDA it scores every position, prompt included, and tiles up to 4,096 tokens.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from peftkit.errors import AdapterError

CHUNK_ELEMENTS = 2**23  # logits per chunk: 32 MiB of float32, ~170 rows of a 49,152-word vocabulary
IGNORE = -100
# Config fields by which some causal LMs transform the head's output: their loss is left to the model
UNSUPPORTED_LOGIT_FIELDS = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier")


@dataclass
class LabelledLoss:
    """The loss and the per-token statistics trl logs, over the n labelled positions."""

    loss: Tensor  # () the summed negative log-likelihood over `normaliser`
    log_probs: Tensor  # (n,) of each labelled token
    entropy: Tensor  # (n,) of each predicted distribution, without gradient
    correct: Tensor  # (n,) bool: the label is the argmax (the first one, on ties)


def supports_labelled_loss(model: nn.Module) -> bool:
    """Whether the model's logits are its output embedding's output (optionally soft-capped),
    which is what this loss computes; others keep their own loss."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "is_encoder_decoder", False) or model.get_output_embeddings() is None:
        return False
    return all(getattr(config, field, None) in (None, 1.0) for field in UNSUPPORTED_LOGIT_FIELDS)


def _logits(hidden: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """(rows, V) float32 logits of a chunk, as the model computes them (Gemma's tanh soft-cap included)."""
    logits = nn.functional.linear(hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype))
    logits = logits.float()
    if softcap is not None:
        logits = torch.tanh(logits.div_(softcap)).mul_(softcap)
    return logits


def _chunks(rows: int, vocab: int) -> Iterator[slice]:
    step = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


class _ChunkedLogProbs(torch.autograd.Function):
    """log softmax(h W^T + b)[y] per row, chunk by chunk; gradients to h, W and b as they need them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                softcap: float | None) -> tuple[Tensor, Tensor, Tensor]:
        rows = hidden.shape[0]
        log_z = hidden.new_empty(rows, dtype=torch.float32)
        target_logit, entropy = torch.empty_like(log_z), torch.empty_like(log_z)
        correct = torch.empty(rows, dtype=torch.bool, device=hidden.device)
        for part in _chunks(rows, weight.shape[0]):
            logits = _logits(hidden[part], weight, bias, softcap)  # (chunk, V)
            y = targets[part].unsqueeze(1)
            target_logit[part] = logits.gather(1, y).squeeze(1)
            correct[part] = logits.argmax(1) == targets[part]
            top = logits.amax(1, keepdim=True)
            shifted = logits.sub_(top)  # in place: z - max
            exp = shifted.exp()
            total = exp.sum(1)
            log_z[part] = top.squeeze(1) + total.log()
            # H = log Z - E_p[z] = log sum e^(z - m) - sum e^(z - m) (z - m) / sum e^(z - m)
            entropy[part] = total.log() - exp.mul_(shifted).sum(1) / total
        ctx.save_for_backward(hidden, weight, bias, targets, log_z)
        ctx.softcap = softcap
        ctx.mark_non_differentiable(entropy, correct)
        return target_logit - log_z, entropy, correct

    @staticmethod
    def backward(ctx, grad_log_probs: Tensor, _entropy: Tensor, _correct: Tensor):
        hidden, weight, bias, targets, log_z = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for part in _chunks(hidden.shape[0], weight.shape[0]):
            logits = _logits(hidden[part], weight, bias, ctx.softcap)  # z: (chunk, V)
            # z = cap tanh(l / cap) (Gemma): dz/dl = 1 - (z / cap)^2
            derivative = None if ctx.softcap is None else 1 - (logits / ctx.softcap).square()
            # d log p_y / dz_j = [j = y] - p_j, so dL/dz = -g (p - onehot(y))
            grad = logits.sub_(log_z[part].unsqueeze(1)).exp_()  # p, in place
            grad.scatter_add_(1, targets[part].unsqueeze(1), grad.new_full((grad.shape[0], 1), -1.0))
            grad.mul_(-grad_log_probs[part].float().unsqueeze(1))
            if derivative is not None:
                grad.mul_(derivative)
            if need_hidden:
                grad_hidden[part] = (grad.to(hidden.dtype) @ weight.to(hidden.dtype)).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(grad.t(), hidden[part].float())
            if need_bias:
                grad_bias += grad.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def labelled_log_probs(hidden: Tensor, head: nn.Module, targets: Tensor,
                       softcap: float | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row log-probability of `targets` under `head`, with the rows' entropy and top-1 hit.

    Args:
        hidden: (n, H) hidden states of the labelled positions.
        head: the output embedding (`weight` (V, H), optional `bias` (V,)).
        targets: (n,) token ids.
        softcap: Gemma's `final_logit_softcapping`, or None.

    Returns:
        log_probs (n,) float32 (differentiable), entropy (n,) float32 and correct (n,) bool.
    """
    return _ChunkedLogProbs.apply(hidden, head.weight, getattr(head, "bias", None), targets, softcap)


@contextlib.contextmanager
def hidden_states_as_logits(model: nn.Module) -> Iterator[None]:
    """Within the block the output embedding returns its input: the model's `logits` are the last
    hidden states (B, T, H). The forward runs as usual otherwise, with every hook of the adapters
    (virtual tokens, their trimming of the output) and of data parallelism."""
    head = model.get_output_embeddings()
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    softcap = getattr(config, "final_logit_softcapping", None)
    head.forward = lambda hidden: hidden  # an instance attribute shadows the class's forward
    if softcap is not None:
        config.final_logit_softcapping = None  # applied to the logits by `labelled_log_probs` instead
    try:
        yield
    finally:
        del head.forward
        if softcap is not None:
            config.final_logit_softcapping = softcap


def labelled_loss(model: nn.Module, inputs: dict, num_items_in_batch: Tensor | int | None = None) -> LabelledLoss:
    """The causal-LM loss of `model(**inputs)` against `inputs["labels"]`, computed on the labelled
    positions only (see the module docstring); equal to the model's own loss.

    Args:
        model: a causal LM for which `supports_labelled_loss` holds (possibly wrapped for data parallelism).
        inputs: the model's keyword arguments, with `labels` (B, T) holding -100 where nothing is scored.
        num_items_in_batch: the normaliser (labelled tokens over gradient accumulation, as the
            Trainer counts them); None: this batch's labelled tokens.

    Raises:
        AdapterError: the inputs carry no labels.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    if labels is None:
        raise AdapterError("labelled_loss needs `labels` in the inputs: pass the collator's labels (-100 where unscored)")
    base = model.module if hasattr(model, "module") and not hasattr(model, "get_output_embeddings") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    softcap = getattr(config, "final_logit_softcapping", None)
    with hidden_states_as_logits(base):
        hidden = model(**inputs, use_cache=False).logits  # (B, n + T, H): prompt tuning's n virtual tokens lead
    hidden = hidden[:, -labels.shape[1]:]
    shifted = labels[:, 1:]
    mask = shifted != IGNORE
    log_probs, entropy, correct = labelled_log_probs(hidden[:, :-1][mask], base.get_output_embeddings(),
                                                     shifted[mask], softcap)
    count = mask.sum() if num_items_in_batch is None else num_items_in_batch
    loss = -log_probs.sum() / torch.as_tensor(count, device=log_probs.device).clamp(min=1)
    return LabelledLoss(loss=loss, log_probs=log_probs, entropy=entropy, correct=correct)
