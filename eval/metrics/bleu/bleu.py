"""Corpus-level, multi-reference BLEU via sacrebleu, as a local `evaluate` module.

    import evaluate
    bleu = evaluate.load("eval/metrics/bleu")   # a path: the hub is never contacted
    bleu.compute(predictions=["a cat sat"], references=[["a cat sat", "the cat sat"]])
"""

import datasets
import evaluate
from sacrebleu.metrics import BLEU

_DESCRIPTION = """Corpus BLEU (Papineni et al., 2002) computed by sacrebleu (Post, 2018). Every prediction is
scored against all of its references at once; predictions may have different numbers of references."""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list[str]): one hypothesis per example.
    references (list[list[str]] or list[str]): the references of each example.
    tokenize (str): sacrebleu tokenizer, default "13a" (the WMT standard, mteval-v13a).
    lowercase (bool): lowercase before scoring, default False.
Returns:
    score (float, 0-100), precisions (list of four n-gram precisions, 0-100), bp (brevity
    penalty), sys_len, ref_len, tokenize, and signature (sacrebleu's reproducibility string).
"""

_CITATION = """@inproceedings{post-2018-call, title = "A Call for Clarity in Reporting {BLEU} Scores",
author = "Post, Matt", booktitle = "Proceedings of the Third Conference on Machine Translation", year = "2018"}"""


class Bleu(evaluate.Metric):
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

    def _compute(self, predictions: list[str], references: list, tokenize: str = "13a",
                 lowercase: bool = False) -> dict:
        references = [[refs] if isinstance(refs, str) else list(refs) for refs in references]
        width = max((len(refs) for refs in references), default=0)
        # sacrebleu takes reference streams (stream i = the i-th reference of every example);
        # None marks an example with fewer references
        streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
        metric = BLEU(tokenize=tokenize, lowercase=lowercase)
        result = metric.corpus_score(predictions, streams)
        return {"score": result.score, "precisions": list(result.precisions), "bp": result.bp,
                "sys_len": result.sys_len, "ref_len": result.ref_len, "tokenize": tokenize,
                "signature": str(metric.get_signature())}
