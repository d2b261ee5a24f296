"""Training examples for the tasks that are not language modelling (see `peftkit.data` for those).

    seq-cls   sst2 rows (label, sentence) or text rows with a `label`   -> the text and its class id
    seq2seq   every prompt/completion format (alpaca, chat, sst2, e2e, gsm8k, seq2seq)
              -> encoder input: the prompt's text; decoder labels: the completion and an end token

A classifier sees the bare text (no instruction, no chat template), with the tokenizer's own
special tokens ([CLS] ... [SEP] for BERT). An encoder-decoder is trained on the target only:
the source is never in the labels, which is what "labels on the target" means there.
"""

import logging
from collections.abc import Iterable

from transformers import PreTrainedTokenizerBase

from peftkit.data import PAIR_FORMATS, DataStats, Row, need_fields, sst2_fields
from peftkit.errors import ConfigError

logger = logging.getLogger(__name__)

CLASS_FORMATS = ("sst2", "text")


def class_example(row: Row, fmt: str) -> tuple[str, int]:
    """(text, class id) of one row for a classification head."""
    if fmt == "sst2":
        text, label = sst2_fields(row)
        return text.strip(), int(label)
    if fmt == "text":
        (text,) = need_fields(row, "text")
        label = row.fields.get("label")
        if isinstance(label, str) and label.strip().isdigit():
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ConfigError(f"{row.where}: task seq-cls needs a 'label' field holding a class id (0, 1, ...): "
                              f"fix the row")
        return text, label
    raise ConfigError(f"data.format: task seq-cls reads {' or '.join(CLASS_FORMATS)} rows (a text and a class id), "
                      f"not {fmt}: set data.format to sst2, or text with a label field")


def check_labels(labels: list[int], num_labels: int | None, source: str) -> None:
    """The head's size must cover every class id in the data.

    Raises:
        ConfigError: num_labels missing, or a label outside 0 .. num_labels - 1.
    """
    found = sorted(set(labels))
    needed = found[-1] + 1 if found else 2
    shown = ", ".join(map(str, found[:10])) + (", ..." if len(found) > 10 else "")
    if num_labels is None:
        raise ConfigError(f"num_labels: task seq-cls needs the number of classes; {source} has labels {shown}: "
                          f"set num_labels: {needed}")
    if needed > num_labels:
        raise ConfigError(f"num_labels: {num_labels} does not match the labels of {source} ({shown}): class ids "
                          f"must be 0 to num_labels - 1, so set num_labels: {needed}")
    if len(found) < num_labels:
        logger.warning("%s: only %d of the %d classes occur in the training data", source, len(found), num_labels)


def _cut(ids: list[int], max_length: int, special: set[int]) -> tuple[list[int], bool]:
    """`ids` cut to `max_length`, keeping a closing special token ([SEP], </s>) at the end."""
    if len(ids) <= max_length:
        return ids, False
    return (ids[: max_length - 1] + ids[-1:] if ids[-1] in special else ids[:max_length]), True


def tokenize_classes(tokenizer: PreTrainedTokenizerBase, rows: Iterable[Row], fmt: str, max_length: int,
                     num_labels: int | None, source: str) -> tuple[dict[str, list], DataStats]:
    """Columns `input_ids` and `labels` (one class id per example) for a seq-cls head."""
    examples = [class_example(row, fmt) for row in rows]
    check_labels([label for _, label in examples], num_labels, source)
    special = set(tokenizer.all_special_ids)
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    stats = DataStats()
    for text, label in examples:
        ids, cut = _cut(tokenizer(text)["input_ids"], max_length, special)
        columns["input_ids"].append(ids)
        columns["labels"].append(label)
        stats.examples += 1
        stats.truncated += cut
        stats.tokens += len(ids)
        stats.trained_tokens += 1  # one label per example
    return columns, stats


def source_text(prompt: list[dict]) -> str:
    """The encoder's input for a prompt: its messages' text, blank-line separated (no chat template)."""
    return "\n\n".join(message["content"] for message in prompt)


def target_ids(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """The decoder's labels: the target's tokens and an end-of-sequence token."""
    ids = tokenizer(target)["input_ids"]
    return ids if ids and ids[-1] == tokenizer.eos_token_id else ids + [tokenizer.eos_token_id]


def tokenize_seq2seq(tokenizer: PreTrainedTokenizerBase, rows: Iterable[Row], fmt: str,
                     max_length: int) -> tuple[dict[str, list], DataStats]:
    """Columns `input_ids` (the source) and `labels` (the target) for an encoder-decoder."""
    if fmt not in PAIR_FORMATS:
        raise ConfigError(f"data.format: task seq2seq needs a source and a target, which {fmt} rows do not have: use "
                          f"one of {', '.join(PAIR_FORMATS)}")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no end-of-sequence token, so targets cannot end: use a seq2seq model's "
                          "own tokenizer")
    special = set(tokenizer.all_special_ids)
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    stats = DataStats()
    for row in rows:
        prompt, target = PAIR_FORMATS[fmt](row)
        source, source_cut = _cut(tokenizer(source_text(prompt))["input_ids"], max_length, special)
        labels, target_cut = _cut(target_ids(tokenizer, target), max_length, special)
        columns["input_ids"].append(source)
        columns["labels"].append(labels)
        stats.examples += 1
        stats.truncated += source_cut or target_cut
        stats.tokens += len(source) + len(labels)
        stats.trained_tokens += len(labels)
    if stats.truncated:
        logger.warning("max_length %d: %d examples truncated (source or target)", max_length, stats.truncated)
    return columns, stats
