"""Macro-averaged F1 for class labels, as a local `evaluate` module.

    import evaluate
    evaluate.load("eval/metrics/f1").compute(predictions=[1, 0, 1], references=[1, 1, 0])
"""

import datasets
import evaluate

_DESCRIPTION = """Macro F1: the unweighted mean over classes of each class's F1 = 2PR / (P + R), the classes
being every label seen in the references or the predictions. A class with no true and no
predicted positives has F1 0 (scikit-learn's zero_division=0)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list[int]): predicted labels.
    references (list[int]): true labels.
Returns:
    f1 (float, 0-1): macro F1; per_class (dict label -> F1).
"""


class F1(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions: list[int], references: list[int]) -> dict:
        per_class = {}
        for label in sorted(set(predictions) | set(references)):
            tp = sum(p == label and r == label for p, r in zip(predictions, references))
            fp = sum(p == label and r != label for p, r in zip(predictions, references))
            fn = sum(p != label and r == label for p, r in zip(predictions, references))
            per_class[label] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0  # 2PR/(P+R) = 2tp/(2tp+fp+fn)
        return {"f1": sum(per_class.values()) / len(per_class) if per_class else 0.0, "per_class": per_class}
