"""Corpus-level, multi-reference chrF via sacrebleu, as a local `evaluate` module.

    import evaluate
    chrf = evaluate.load("eval/metrics/chrf")
    chrf.compute(predictions=["a cat sat"], references=[["a cat sat", "the cat sat"]])
"""

import datasets
import evaluate
from sacrebleu.metrics import CHRF

_DESCRIPTION = """chrF (Popovic, 2015): character n-gram F-score (n up to 6, beta 2), computed by sacrebleu
over the corpus; each prediction is matched against all of its references."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list[str]): one hypothesis per example.
    references (list[list[str]] or list[str]): the references of each example.
Returns:
    score (float, 0-100) and signature (sacrebleu's reproducibility string).
"""

_CITATION = """@inproceedings{popovic-2015-chrf, title = "chr{F}: character n-gram {F}-score for automatic
{MT} evaluation", author = "Popovi{\\'c}, Maja", booktitle = "Proceedings of WMT", year = "2015"}"""


class Chrf(evaluate.Metric):
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
            reference_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions: list[str], references: list) -> dict:
        references = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
        width = max((len(refs) for refs in references), default=0)
        streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
        metric = CHRF()
        return {"score": metric.corpus_score(predictions, streams).score, "signature": str(metric.get_signature())}
