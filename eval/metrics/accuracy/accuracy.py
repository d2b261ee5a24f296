"""Accuracy for class labels, as a local `evaluate` module.

    import evaluate
    evaluate.load("eval/metrics/accuracy").compute(predictions=[1, 0], references=[1, 1])  # {'accuracy': 0.5}
"""

import datasets
import evaluate

_DESCRIPTION = """Accuracy: the share of predictions equal to their reference label."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list[int]): predicted labels.
    references (list[int]): true labels.
Returns:
    accuracy (float, 0-1).
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: list[int], references: list[int]) -> dict:
        correct = sum(p == r for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references) if references else 0.0}
