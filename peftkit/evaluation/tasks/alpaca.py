"""Held-out Alpaca: the model's loss and perplexity on answers it was not trained on.

The held-out slice is `split_heldout(len(file), heldout_fraction, split_seed)`, the split the
training pipeline uses. Each record becomes a chat (user: instruction, then the input after a
blank line when there is one; assistant: the output); only the answer and its end-of-turn token
are scored (completion-only labels, as in training).
"""

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.evaluation.data import read_alpaca
from peftkit.evaluation.prompts import chat_example, pad_id
from peftkit.evaluation.scoring import completion_loss
from peftkit.evaluation.spec import TaskResult, TaskSpec, check_fraction, check_positive_int
from peftkit.evaluation.splits import split_heldout


def alpaca_chat(record: dict[str, str]) -> list[dict[str, str]]:
    """An Alpaca record as chat messages: the user's instruction (and input), the assistant's output."""
    user = f"{record['instruction']}\n\n{record['input']}" if record["input"].strip() else record["instruction"]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


@dataclass
class AlpacaSpec(TaskSpec):
    heldout_fraction: float = 0.05  # share of the file held out; training must use the same split
    split_seed: int = 42  # the split's seed
    max_length: int = 1024  # longer examples are cut to this many tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(f"{self.name}: heldout_fraction", self.heldout_fraction)
        check_positive_int(f"{self.name}: max_length", self.max_length)


MODEL_TASKS = ("causal-lm",)  # the model tasks (peftkit.models.TASKS) this eval task can score
SPEC = AlpacaSpec


def run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: AlpacaSpec, limit: int | None = None,
        progress: bool = True) -> TaskResult:
    """Mean completion-only loss (nats per token) and its perplexity on the held-out slice."""
    records = read_alpaca(Path(spec.data))
    _, heldout = split_heldout(len(records), spec.heldout_fraction, spec.split_seed)
    scored = heldout[:limit]
    examples = [chat_example(tokenizer, alpaca_chat(records[i]), spec.max_length) for i in scored]
    rows: list = []
    total, tokens = completion_loss(model, examples, pad_id(tokenizer), spec.batch_size, spec.name, progress,
                                    per_example=rows)
    loss = total / tokens if tokens else float("nan")
    details = {
        "split": (f"split_heldout({len(records)}, fraction={spec.heldout_fraction}, seed={spec.split_seed}): "
                  f"{len(heldout)} held out; scored the first {len(scored)}"),
        "labels": "completion-only: the answer and its end-of-turn token; the prompt is masked",
        "tokens": tokens,
        "loss_unit": "nats per scored token, averaged over all scored tokens",
    }
    return TaskResult(metrics={"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan")},
                      n=len(scored), details=details,
                      scores={"nll": [nats for nats, _ in rows], "tokens": [count for _, count in rows]})
