"""Our `evaluate` metric modules against their references, and GSM8K answer extraction."""

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from peftkit.evaluation.metrics import compute, load_metric
from peftkit.evaluation.tasks.gsm8k import extract_answer, normalise_number

PREDICTIONS = ["the cat sat on the mat", "a dog barked loudly at night", "hello world", "the weather is nice today"]
REFERENCES = [  # a variable number of references per prediction, as E2E has
    ["the cat is on the mat", "there is a cat on the mat"],
    ["the dog barked loudly at night", "a dog was barking in the night", "dogs bark"],
    ["hello world !"],
    ["today the weather is nice", "nice weather today"],
]


def streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: stream i holds every example's i-th reference (None when it has fewer)."""
    width = max(len(r) for r in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]


def test_bleu_equals_sacrebleu_multi_reference():
    ours = compute("bleu", PREDICTIONS, REFERENCES)
    ref = sacrebleu.corpus_bleu(PREDICTIONS, streams(REFERENCES))
    assert ours["score"] == pytest.approx(ref.score, abs=1e-9)
    assert ours["tokenize"] == "13a" and "tok:13a" in ours["signature"] and "nrefs:var" in ours["signature"]
    assert 0 < ours["score"] < 100


def test_bleu_equal_reference_counts_and_single_strings():
    refs = [r[:1] for r in REFERENCES]
    assert compute("bleu", PREDICTIONS, refs)["score"] == pytest.approx(
        sacrebleu.corpus_bleu(PREDICTIONS, [[r[0] for r in REFERENCES]]).score, abs=1e-9)
    flat = compute("bleu", PREDICTIONS, [r[0] for r in REFERENCES])  # one reference each, as plain strings
    assert flat["score"] == pytest.approx(compute("bleu", PREDICTIONS, refs)["score"], abs=1e-9)


def test_bleu_is_corpus_level_not_a_mean_of_sentences():
    corpus = compute("bleu", PREDICTIONS, REFERENCES)["score"]
    sentences = [compute("bleu", [p], [r])["score"] for p, r in zip(PREDICTIONS, REFERENCES)]
    assert corpus != pytest.approx(sum(sentences) / len(sentences))


def test_chrf_equals_sacrebleu():
    ours = compute("chrf", PREDICTIONS, REFERENCES)["score"]
    assert ours == pytest.approx(sacrebleu.corpus_chrf(PREDICTIONS, streams(REFERENCES)).score, abs=1e-9)


def test_rouge_l_equals_rouge_score_best_reference_mean():
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    best = [scorer.score_multi(refs, pred)["rougeL"].fmeasure for pred, refs in zip(PREDICTIONS, REFERENCES)]
    assert compute("rouge", PREDICTIONS, REFERENCES)["rougeL"] == pytest.approx(sum(best) / len(best), abs=1e-12)


def test_accuracy_and_macro_f1_hand_checked():
    predictions = [1, 1, 0, 1, 0, 0, 1, 0]
    references = [1, 0, 0, 1, 1, 0, 1, 1]
    # correct at positions 0, 2, 3, 5, 6: 5 of 8
    assert compute("accuracy", predictions, references)["accuracy"] == pytest.approx(5 / 8)
    # class 1: tp 3 (pos 0, 3, 6), fp 1 (pos 1), fn 2 (pos 4, 7): F1 = 2*3 / (2*3 + 1 + 2) = 6/9
    # class 0: tp 2 (pos 2, 5), fp 2 (pos 4, 7), fn 1 (pos 1):    F1 = 2*2 / (2*2 + 2 + 1) = 4/7
    # macro F1 = (6/9 + 4/7) / 2 = (14/21 + 12/21) / 2 = 13/21 = 0.619047...
    result = compute("f1", predictions, references)
    assert result["f1"] == pytest.approx(13 / 21)
    assert result["per_class"][1] == pytest.approx(6 / 9) and result["per_class"][0] == pytest.approx(4 / 7)


def test_f1_class_never_predicted_counts_zero():
    # class 0 is never predicted: tp 0, so its F1 is 0; class 1: tp 2, fp 2, fn 0: F1 = 4/6
    assert compute("f1", [1, 1, 1, 1], [1, 0, 1, 0])["f1"] == pytest.approx((0 + 4 / 6) / 2)


def test_unknown_metric_lists_ours():
    from peftkit.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown metric 'meteor'.*bleu"):
        load_metric("meteor")


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips.\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("The total is\n#### $18.00", "18"),
    ("#### 42\nNext question: Tom has 7 apples", "42"),  # the number right after '####'
    ("So she pays 5 + 7 = 12 dollars.", "12"),  # no '####': the last number
    ("The answer is $1,234.", "1234"),
    ("It drops to -3 degrees", "-3"),
    ("It takes 3.5 hours.", "3.5"),
    ("She has 9 apples in all.\n#### nine", "9"),  # nothing numeric after '####': the last number
    ("I do not know.", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_normalise_number():
    assert normalise_number("$1,000.") == "1000"
    assert normalise_number("0.50") == "0.5"
    assert normalise_number("7") == "7"
