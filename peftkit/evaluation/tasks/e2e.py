"""E2E NLG: generate a restaurant description from a meaning representation (mr), then score it.

`devset.csv` is split by mr (`split_e2e`, the same split training uses); generations for the
held-out mrs are scored against all references of their mr at once: corpus BLEU (sacrebleu,
13a tokenisation), ROUGE-L (best reference per prediction, then the mean) and chrF.
k-shot examples are (mr, first reference) pairs from the training part.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from torch import nn
from transformers import PreTrainedTokenizerBase

from peftkit.evaluation.data import read_e2e
from peftkit.evaluation.generation import generate
from peftkit.evaluation.metrics import compute
from peftkit.evaluation.prompts import generation_prompt_ids, messages
from peftkit.evaluation.spec import GenerationSettings, PromptedSpec, TaskResult, check_fraction, generation_settings
from peftkit.evaluation.splits import draw, group_references, split_e2e


@dataclass
class E2ESpec(PromptedSpec):
    """`prompt` placeholder: `{mr}`, the meaning representation."""

    PLACEHOLDERS: ClassVar[tuple[str, ...]] = ("mr",)

    prompt: str = "{mr}"
    heldout_fraction: float = 0.2  # share of distinct mrs held out for evaluation
    split_seed: int = 0  # the mr split's seed; training must use the same one
    bleu_tokenize: str = "13a"  # sacrebleu tokenizer for BLEU
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    score_all: bool = False  # score every mr of data (a study's dev split), not the held-out part

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(f"{self.name}: heldout_fraction", self.heldout_fraction)
        self.generation = generation_settings(self.generation, self.name)


MODEL_TASKS = ("causal-lm", "seq2seq")  # the model tasks (peftkit.models.TASKS) this eval task can score
SPEC = E2ESpec
METRICS = ("bleu", "rougeL", "chrf")  # what `run` reports
TRAIN_FORMAT = "e2e"  # the training data format whose rows this task scores (a study's dev split)


def whole_file(rows: int) -> dict:
    """Spec overrides that score every mr of `data` (a dev split), not its held-out part."""
    return {"score_all": True}


def run(model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec: E2ESpec, limit: int | None = None,
        progress: bool = True) -> TaskResult:
    """BLEU, ROUGE-L and chrF (percent) of generations for the held-out mrs (the first `limit`)."""
    rows = read_e2e(Path(spec.data))
    train, heldout = ([], rows) if spec.score_all else split_e2e(rows, spec.heldout_fraction, spec.split_seed)
    all_groups = group_references(heldout)
    groups = all_groups[:limit]
    turns = [(spec.fill(mr=mr), refs[0]) for mr, refs in draw(group_references(train), spec.shots, spec.seed)]
    prompts = [generation_prompt_ids(model, tokenizer, messages(turns, spec.fill(mr=mr))) for mr, _ in groups]
    predictions = generate(model, tokenizer, prompts, spec.generation, spec.batch_size, spec.name, progress)
    references = [refs for _, refs in groups]
    bleu = compute("bleu", predictions, references, tokenize=spec.bleu_tokenize)
    chrf = compute("chrf", predictions, references)
    metrics = {"bleu": bleu["score"], "rougeL": 100 * compute("rouge", predictions, references)["rougeL"],
               "chrf": chrf["score"]}
    details = {
        "split": f"every mr of {spec.data} ({len(groups)})" if spec.score_all else (
            f"split_e2e by mr hash (fraction {spec.heldout_fraction}, seed {spec.split_seed}): "
            f"{len(all_groups)} of {len(all_groups) + len(group_references(train))} mrs held out; "
            f"scored the first {len(groups)}"),
        "references": sum(len(refs) for refs in references),
        "bleu": {"tokenize": spec.bleu_tokenize, "signature": bleu["signature"],
                 "note": "corpus BLEU, all references of an mr at once"},
        "rougeL": "rouge_score F-measure, no stemming; best reference per prediction, then the mean",
        "chrf": {"signature": chrf["signature"]},
    }
    examples = [{"mr": mr, "prediction": pred, "reference": refs[0]}
                for (mr, refs), pred in zip(groups[:3], predictions)]
    return TaskResult(metrics=metrics, n=len(groups), details=details, examples=examples,
                      scores=e2e_scores(predictions, references, spec.bleu_tokenize))


def e2e_scores(predictions: list[str], references: list[list[str]], tokenize: str) -> dict[str, list]:
    """Per meaning representation: its BLEU and chrF statistics and its best-reference ROUGE-L."""
    from rouge_score import rouge_scorer

    from peftkit.stats import bleu_statistics, chrf_statistics

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in refs) for pred, refs in zip(predictions, references)]
    return {"bleu_stats": bleu_statistics(predictions, references, tokenize),
            "chrf_stats": chrf_statistics(predictions, references), "rougeL": rouge,
            "prediction": list(predictions)}
