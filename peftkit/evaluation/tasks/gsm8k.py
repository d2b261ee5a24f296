"""GSM8K: chain-of-thought generation, answer extraction, exact match.

The data holds only GSM8K's training file, so evaluation uses a seeded slice of it
(`eval_size` problems, `split_seed`); k-shot examples come from the rest of the file, their
worked answers shown as prior assistant turns (calculator annotations `<<...>>` removed).
Zero-shot, the prompt itself asks for step-by-step reasoning ("Let's think step by step").
"""

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.evaluation.data import read_gsm8k
from peftkit.evaluation.generation import generate
from peftkit.evaluation.prompts import generation_prompt_ids, messages
from peftkit.evaluation.spec import (GenerationSettings, PromptedSpec, TaskResult, check_positive_int,
                                     generation_settings)
from peftkit.evaluation.splits import draw

NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")
CALCULATOR = re.compile(r"<<[^>]*>>")


def normalise_number(text: str) -> str:
    """'$1,000.00' -> '1000': drop '$' and commas and a trailing '.', and write whole numbers as integers."""
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(text)
    except ValueError:
        return text
    return str(int(value)) if value.is_integer() else repr(value)


def extract_answer(text: str) -> str | None:
    """The final answer of a worked solution: the number after '####', else the last number; normalised.

    Returns:
        The normalised number, or None when the text has no number.
    """
    _, marker, tail = text.partition("####")
    if marker and (after := NUMBER.search(tail)):
        return normalise_number(after.group())
    numbers = NUMBER.findall(text)
    return normalise_number(numbers[-1]) if numbers else None


@dataclass
class Gsm8kSpec(PromptedSpec):
    """`prompt` placeholder: `{question}`."""

    PLACEHOLDERS: ClassVar[tuple[str, ...]] = ("question",)

    prompt: str = "{question}\nLet's think step by step."
    eval_size: int = 500  # problems in the seeded evaluation slice of the file
    split_seed: int = 42  # picks the slice; the rest of the file supplies k-shot examples
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(max_new_tokens=256))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(f"{self.name}: eval_size", self.eval_size)
        self.generation = generation_settings(self.generation, self.name)


MODEL_TASKS = ("causal-lm", "seq2seq")  # the model tasks (peftkit.models.TASKS) this eval task can score
SPEC = Gsm8kSpec
METRICS = ("exact_match", "answer_found")  # what `run` reports
TRAIN_FORMAT = "gsm8k"  # the training data format whose rows this task scores (a study's dev split)


def whole_file(rows: int) -> dict:
    """Spec overrides that score every row of `data` (a dev split), not a slice of it."""
    return {"eval_size": rows}


def eval_slice(n: int, size: int, seed: int) -> tuple[list[int], list[int]]:
    """(evaluation indices in seeded order, the remaining indices): `limit` takes a random subset."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order[:size], sorted(order[size:])


def run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: Gsm8kSpec, limit: int | None = None,
        progress: bool = True) -> TaskResult:
    """Exact match (percent) of the extracted final answer on the first `limit` problems of the slice."""
    rows = read_gsm8k(Path(spec.data))
    evaluated, pool = eval_slice(len(rows), spec.eval_size, spec.split_seed)
    evaluated = evaluated[:limit]
    shots = [rows[i] for i in draw(pool, spec.shots, spec.seed)]
    turns = [(spec.fill(question=s["question"]), CALCULATOR.sub("", s["answer"])) for s in shots]
    prompts = [generation_prompt_ids(model, tokenizer, messages(turns, spec.fill(question=rows[i]["question"])))
               for i in evaluated]
    outputs = generate(model, tokenizer, prompts, spec.generation, spec.batch_size, spec.name, progress)
    predicted = [extract_answer(text) for text in outputs]
    gold = [extract_answer(rows[i]["answer"]) for i in evaluated]
    n = max(len(evaluated), 1)
    metrics = {"exact_match": 100 * sum(p is not None and p == g for p, g in zip(predicted, gold)) / n,
               "answer_found": 100 * sum(p is not None for p in predicted) / n}
    details = {
        "slice": (f"{min(spec.eval_size, len(rows))} of {len(rows)} problems of the file, picked with seed "
                  f"{spec.split_seed} (GSM8K's test split is not used); scored the first {len(evaluated)}"),
        "prompting": f"{spec.shots}-shot chain of thought" if spec.shots else "zero-shot chain of thought",
        "extraction": "the number after '####', else the last number; '$', commas and a trailing '.' removed",
    }
    examples = [{"question": rows[i]["question"], "output": out, "predicted": p, "gold": g}
                for i, out, p, g in zip(evaluated[:3], outputs, predicted, gold)]
    correct = [int(p is not None and p == g) for p, g in zip(predicted, gold)]
    return TaskResult(metrics=metrics, n=len(evaluated), details=details, examples=examples,
                      scores={"correct": correct, "exact_match": correct, "answer_found": [int(p is not None)
                                                                                         for p in predicted]})
