"""Held-out Alpaca: the model's loss and perplexity on answers it was not trained on.

The held-out slice is `split_heldout(len(file), heldout_fraction, split_seed)`, the split the
training pipeline uses. Each record becomes a chat (user: instruction, then the input after a
blank line when there is one; assistant: the output); only the answer and its end-of-turn token
are scored (completion-only labels, as in training). The first `samples` held-out instructions
are also answered (greedy, `sample_tokens` at most), so a report shows what the loss means.
"""

import math
from dataclasses import dataclass
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.errors import ConfigError
from peftkit.evaluation.data import read_alpaca
from peftkit.evaluation.generation import GenerationUnsupported, generate
from peftkit.evaluation.prompts import chat_example, generation_prompt_ids, pad_id
from peftkit.evaluation.scoring import completion_loss
from peftkit.evaluation.spec import GenerationSettings, TaskResult, TaskSpec, check_fraction, check_positive_int
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
    samples: int = 3  # held-out instructions answered for a look (0: none)
    sample_tokens: int = 64  # their answers' length at most
    score_all: bool = False  # score every record of data (a study's dev split), not the held-out part

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(f"{self.name}: heldout_fraction", self.heldout_fraction)
        check_positive_int(f"{self.name}: max_length", self.max_length)
        check_positive_int(f"{self.name}: sample_tokens", self.sample_tokens)
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise ConfigError(f"{self.name}: samples must be a whole number >= 0, got {self.samples!r}")


MODEL_TASKS = ("causal-lm",)  # the model tasks (peftkit.models.TASKS) this eval task can score
SPEC = AlpacaSpec
METRICS = ("loss", "perplexity")  # what `run` reports
TRAIN_FORMAT = "alpaca"  # the training data format whose rows this task scores (a study's dev split)


def whole_file(rows: int) -> dict:
    """Spec overrides that score every record of `data` (a dev split), not its held-out part."""
    return {"score_all": True, "samples": 0}


def run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: AlpacaSpec, limit: int | None = None,
        progress: bool = True) -> TaskResult:
    """Mean completion-only loss (nats per token) and its perplexity on the held-out slice."""
    records = read_alpaca(Path(spec.data))
    heldout = (list(range(len(records))) if spec.score_all
               else split_heldout(len(records), spec.heldout_fraction, spec.split_seed)[1])
    scored = heldout[:limit]
    examples = [chat_example(tokenizer, alpaca_chat(records[i]), spec.max_length) for i in scored]
    rows: list = []
    total, tokens = completion_loss(model, examples, pad_id(tokenizer), spec.batch_size, spec.name, progress,
                                    per_example=rows)
    loss = total / tokens if tokens else float("nan")
    details = {
        "split": f"every record of {spec.data} ({len(scored)})" if spec.score_all else (f"split_heldout({len(records)}, fraction={spec.heldout_fraction}, seed={spec.split_seed}): "
                  f"{len(heldout)} held out; scored the first {len(scored)}"),
        "labels": "completion-only: the answer and its end-of-turn token; the prompt is masked",
        "tokens": tokens,
        "loss_unit": "nats per scored token, averaged over all scored tokens",
    }
    return TaskResult(metrics={"loss": loss, "perplexity": math.exp(loss) if tokens else float("nan")},
                      n=len(scored), details=details, examples=sample_answers(model, tokenizer, spec, records, scored),
                      scores={"nll": [nats for nats, _ in rows], "tokens": [count for _, count in rows]})


def sample_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: AlpacaSpec, records: list[dict],
                   scored: list[int]) -> list[dict[str, str]]:
    """The model's greedy answers to the first `spec.samples` held-out instructions; none where the
    model cannot generate (peft's prefix-tuning under transformers 5)."""
    chats = [alpaca_chat(records[i])[:1] for i in scored[: spec.samples]]
    if not chats:
        return []
    prompts = [generation_prompt_ids(model, tokenizer, chat) for chat in chats]
    try:
        outputs = generate(model, tokenizer, prompts, GenerationSettings(max_new_tokens=spec.sample_tokens),
                           spec.batch_size, None, False)
    except GenerationUnsupported:
        return []
    return [{"instruction": chat[0]["content"], "output": output, "reference": records[i]["output"]}
            for chat, output, i in zip(chats, outputs, scored)]
