"""SST-2 sentiment, scored by log-likelihood: which label word does the model find more likely?

The user message is the prompt with the sentence; the candidate answers are the label words as
the assistant's reply. k-shot examples come from the training file, balanced over the labels,
drawn once with the spec's seed and shown as prior chat turns before every test sentence.

A sequence classifier (task seq-cls, e.g. `lora-sst2-minilm`) is scored by its head instead:
the prediction is the argmax of its logits on the bare sentence, class id = SST-2 label.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.errors import ConfigError
from peftkit.evaluation.data import read_sst2
from peftkit.evaluation.metrics import compute
from peftkit.evaluation.classify import classify
from peftkit.evaluation.prompts import messages, pad_id, prompt_ids
from peftkit.evaluation.scoring import score_candidates
from peftkit.evaluation.spec import PromptedSpec, TaskResult
from peftkit.evaluation.splits import draw_balanced
from peftkit.models.tasks import task_of_model

logger = logging.getLogger(__name__)


@dataclass
class Sst2Spec(PromptedSpec):
    """`prompt` placeholder: `{text}`, the sentence."""

    shots_data: str | None = None  # the labelled file k-shot examples are drawn from (needed when shots > 0)
    labels: dict[int, str] = field(default_factory=lambda: {1: "positive", 0: "negative"})  # label -> answer word

    def __post_init__(self) -> None:
        super().__post_init__()
        if (not isinstance(self.labels, dict) or set(self.labels) != {0, 1}
                or not all(isinstance(w, str) and w.strip() for w in self.labels.values())):
            raise ConfigError(f"{self.name}: labels must map 0 and 1 to answer words, e.g. "
                              f"{{1: positive, 0: negative}}, got {self.labels!r}")
        if self.shots and self.shots_data is None:
            raise ConfigError(f"{self.name}: shots: {self.shots} needs shots_data, the labelled file to draw "
                              f"examples from (e.g. sst2/train.tsv)")

    def data_fields(self) -> tuple[str, ...]:
        return ("data", "shots_data") if self.shots else ("data",)


MODEL_TASKS = ("causal-lm", "seq-cls")  # the model tasks (peftkit.models.TASKS) this eval task can score
SPEC = Sst2Spec
METRICS = ("accuracy", "f1_macro")  # what `run` reports
TRAIN_FORMAT = "sst2"  # the training data format whose rows this task scores (a study's dev split)


def whole_file(rows: int) -> dict:
    """Spec overrides that score every row of `data` (a dev split), not a part of it."""
    return {}


def run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: Sst2Spec, limit: int | None = None,
        progress: bool = True) -> TaskResult:
    """Accuracy and macro F1 (percent) of label-word classification on `spec.data`."""
    rows = read_sst2(Path(spec.data))[:limit]
    if task_of_model(model) == "seq-cls":
        return _run_head(model, tokenizer, spec, rows, progress)
    turns = []
    if spec.shots:
        train = read_sst2(Path(spec.shots_data))
        shots = draw_balanced(train, [label for _, label in train], spec.shots, spec.seed)
        turns = [(spec.fill(text=text), spec.labels[label]) for text, label in shots]
    prompts = [prompt_ids(tokenizer, messages(turns, spec.fill(text=text))) for text, _ in rows]
    order = sorted(spec.labels)
    candidates = [tokenizer(spec.labels[label], add_special_tokens=False)["input_ids"] for label in order]
    scores = score_candidates(model, prompts, candidates, pad_id(tokenizer), spec.batch_size, spec.name, progress)
    predictions = [order[j] for j in scores.argmax(dim=1).tolist()]
    metrics = _metrics(predictions, [label for _, label in rows])
    details = {"scoring": "log-likelihood of each label word as the assistant's answer",
               "shot_selection": f"balanced over labels from shots_data, seed {spec.seed}" if spec.shots else None}
    examples = [{"text": text, "label": label, "prediction": pred,
                 "logprobs": {spec.labels[k]: round(float(s), 4) for k, s in zip(order, row)}}
                for (text, label), pred, row in zip(rows[:3], predictions, scores[:3].tolist())]
    return TaskResult(metrics=metrics, n=len(rows), details=details, examples=examples,
                      scores=per_example(predictions, [label for _, label in rows]))


def per_example(predictions: list[int], labels: list[int]) -> dict[str, list]:
    return {"correct": [int(p == g) for p, g in zip(predictions, labels)], "prediction": predictions, "label": labels}


def _metrics(predictions: list[int], references: list[int]) -> dict[str, float]:
    return {"accuracy": 100 * compute("accuracy", predictions, references)["accuracy"],
            "f1_macro": 100 * compute("f1", predictions, references)["f1"]}


def _run_head(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: Sst2Spec, rows: list[tuple[str, int]],
              progress: bool) -> TaskResult:
    """Accuracy and macro F1 (percent) of the classification head's argmax."""
    if spec.shots:
        logger.info("%s: a classification head takes no in-context examples: shots=%d ignored", spec.name, spec.shots)
    logits = classify(model, tokenizer, [text for text, _ in rows], spec.batch_size, spec.name, progress)
    if logits.shape[1] != 2:
        raise ConfigError(f"{spec.name}: the model's head has {logits.shape[1]} classes, SST-2 has 2: train it with "
                          f"num_labels: 2")
    predictions = logits.argmax(dim=1).tolist()
    metrics = _metrics(predictions, [label for _, label in rows])
    details = {"scoring": "argmax of the sequence-classification head on the bare sentence (class id = label)"}
    examples = [{"text": text, "label": label, "prediction": pred,
                 "logits": [round(float(v), 4) for v in row]}
                for (text, label), pred, row in zip(rows[:3], predictions, logits[:3].tolist())]
    return TaskResult(metrics=metrics, n=len(rows), details=details, examples=examples,
                      scores=per_example(predictions, [label for _, label in rows]))
