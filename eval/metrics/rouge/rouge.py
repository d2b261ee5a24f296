"""ROUGE-L via Google's rouge_score, multi-reference, as a local `evaluate` module.

    import evaluate
    rouge = evaluate.load("eval/metrics/rouge")
    rouge.compute(predictions=["a cat sat"], references=[["a cat sat", "the cat sat"]])
"""

import logging

import datasets
import evaluate
from rouge_score import rouge_scorer

logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score logs "Using default tokenizer." on every scorer

_DESCRIPTION = """ROUGE-L (Lin, 2004): F-measure of the longest common subsequence, computed by rouge_score.
With several references, each prediction takes its best F-measure over its references (as
rouge_score's `score_multi` does), and the corpus score is the mean over predictions."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list[str]): one hypothesis per example.
    references (list[list[str]] or list[str]): the references of each example.
    use_stemmer (bool): Porter-stem words before matching, default False.
Returns:
    rougeL (float, 0-1): mean over predictions of the best ROUGE-L F-measure among its references.
"""

_CITATION = """@inproceedings{lin-2004-rouge, title = "{ROUGE}: A Package for Automatic Evaluation of
Summaries", author = "Lin, Chin-Yew", booktitle = "Text Summarization Branches Out", year = "2004"}"""


class Rouge(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"), "references": datasets.Value("string")}),
            ],
            reference_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions: list[str], references: list, use_stemmer: bool = False) -> dict:
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        best = []
        for prediction, refs in zip(predictions, references):
            refs = [refs] if isinstance(refs, str) else refs
            best.append(max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in refs))
        return {"rougeL": sum(best) / len(best) if best else 0.0}
