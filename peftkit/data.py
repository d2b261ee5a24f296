"""Training data: read local files (or a hub dataset when online), turn rows into chat
prompt/completion pairs, tokenise with the model's chat template, and mask the prompt.

Formats (the `format` of a recipe's data section):

    alpaca   {instruction, input, output}          -> user: instruction (+ input), assistant: output
    chat     {messages: [{role, content}, ...]}    -> the last assistant turn is the completion
    text     {text}                                -> plain language modelling, every token trained
    sst2     TSV label + sentence (or content)      -> user: review, assistant: positive / negative
    e2e      CSV mr, ref                            -> user: meaning representation, assistant: ref
    gsm8k    {question, answer}                     -> user: question, assistant: worked answer
    seq2seq  {source, target}                       -> user: source, assistant: target

With `task: seq2seq` (an encoder-decoder) or `task: seq-cls` (a classification head) the rows
are read the same way and turned into that task's examples by `peftkit.data_tasks`.

Only JSON, JSONL, CSV and TSV are read. A malformed row names its file and line.
"""

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from peftkit.errors import ConfigError

logger = logging.getLogger(__name__)

IGNORE = -100
# Shipped data names -> file under the data root.
NAMED_FILES = {
    "alpaca": ("alpaca/alpaca_5000.json", "alpaca"),
    "sst2": ("sst2/train.tsv", "sst2"),
    "e2e": ("e2e/devset.csv", "e2e"),
    "gsm8k": ("gsm8k/train.jsonl", "gsm8k"),
}
SST2_INSTRUCTION = "Classify the sentiment of this movie review as positive or negative.\n\nReview: "
E2E_INSTRUCTION = "Write a short restaurant description in English from this meaning representation:\n"
SST2_LABELS = {"0": "negative", "1": "positive"}


def data_root() -> Path:
    """`$PEFTKIT_DATA`, else the `shared/data` folder beside a source checkout (or beside one of
    its parent folders)."""
    if env := os.environ.get("PEFTKIT_DATA"):
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    beside = [parent / "shared" / "data" for parent in checkout.parents]
    return next((path for path in beside if path.is_dir()), beside[0])


def resolve_source(train: str) -> tuple[Path, str | None]:
    """A data name (`alpaca`, `sst2`, ...) or a path -> (file, the name's default format)."""
    if train in NAMED_FILES:
        relative, fmt = NAMED_FILES[train]
        return data_root() / relative, fmt
    return Path(train).expanduser(), None


@dataclass
class Row:
    """One source row and where it came from, for error messages."""

    fields: dict
    where: str  # "file:line"


def read_rows(path: Path) -> list[Row]:
    """Rows of a JSON list, JSONL, CSV or TSV file (by extension)."""
    if not path.is_file():
        raise ConfigError(f"data file {path} does not exist: fix the path or set PEFTKIT_DATA to the data folder")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append(Row(_json_object(line, path, number), f"{path}:{number}"))
        return rows
    if suffix == ".json":
        return _json_list_rows(text, path)
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        rows = []
        for fields in reader:
            if None in fields or None in fields.values():
                raise ConfigError(f"{path}:{reader.line_num}: wrong number of columns (header: "
                                  f"{', '.join(reader.fieldnames or [])}): fix the row")
            rows.append(Row(fields, f"{path}:{reader.line_num}"))
        return rows
    raise ConfigError(f"cannot read {path}: data files must be .json, .jsonl, .csv or .tsv")


def _json_object(line: str, path: Path, number: int) -> dict:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{number}: invalid JSON ({exc.msg}): fix the line") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
    return value


def _json_list_rows(text: str, path: Path) -> list[Row]:
    """Decode a JSON array item by item so each row knows its line number."""
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0 or text[:start].strip():
        raise ConfigError(f"{path}: expected a JSON list of objects (or use .jsonl)")
    rows, pos, line, counted = [], start + 1, 1, 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return rows
        line += text.count("\n", counted, pos)  # incremental: linear in the file size
        counted = pos
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg}): fix the file") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
        rows.append(Row(value, f"{path}:{line} (item {len(rows) + 1})"))


# --- formats: a row -> (prompt messages, completion text), or plain text -------------------


def need_fields(row: Row, *keys: str) -> list[str]:
    values = []
    for key in keys:
        value = row.fields.get(key)
        if not isinstance(value, str):
            raise ConfigError(f"{row.where}: missing or non-text field {key!r} for this data format: fix the row "
                              f"or choose another data.format")
        values.append(value)
    return values


def alpaca_pair(row: Row) -> tuple[list[dict], str]:
    instruction, output = need_fields(row, "instruction", "output")
    extra = row.fields.get("input") or ""
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}], output


def chat_pair(row: Row) -> tuple[list[dict], str]:
    messages = row.fields.get("messages")
    if (not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages)
            or messages[-1].get("role") != "assistant" or not isinstance(messages[-1].get("content"), str)):
        raise ConfigError(f"{row.where}: 'messages' must be a list of {{role, content}} ending with an assistant "
                          f"turn: fix the row")
    return messages[:-1], messages[-1]["content"]


def sst2_fields(row: Row) -> tuple[str, str]:
    """(sentence, label "0" or "1") of an SST-2 row: train.tsv calls the text sentence, dev.tsv content."""
    label = row.fields.get("label")
    text = row.fields.get("sentence", row.fields.get("content"))
    if label not in SST2_LABELS or not isinstance(text, str):
        raise ConfigError(f"{row.where}: expected columns label (0 or 1) and sentence (or content): fix the row")
    return text, label


def sst2_pair(row: Row) -> tuple[list[dict], str]:
    text, label = sst2_fields(row)
    return sst2_prompt(text), SST2_LABELS[label]


def sst2_prompt(sentence: str) -> list[dict]:
    return [{"role": "user", "content": SST2_INSTRUCTION + sentence.strip()}]


def e2e_pair(row: Row) -> tuple[list[dict], str]:
    mr, ref = need_fields(row, "mr", "ref")
    return e2e_prompt(mr), ref


def e2e_prompt(mr: str) -> list[dict]:
    return [{"role": "user", "content": E2E_INSTRUCTION + mr}]


def gsm8k_pair(row: Row) -> tuple[list[dict], str]:
    question, answer = need_fields(row, "question", "answer")
    return [{"role": "user", "content": question}], answer


def seq2seq_pair(row: Row) -> tuple[list[dict], str]:
    source, target = need_fields(row, "source", "target")
    return [{"role": "user", "content": source}], target


PAIR_FORMATS: dict[str, Callable[[Row], tuple[list[dict], str]]] = {
    "alpaca": alpaca_pair, "chat": chat_pair, "sst2": sst2_pair, "e2e": e2e_pair, "gsm8k": gsm8k_pair,
    "seq2seq": seq2seq_pair,
}
FORMATS = (*PAIR_FORMATS, "text")


def e2e_split(rows: list[Row], heldout_fraction: float, seed: int = 0) -> tuple[list[Row], list[Row]]:
    """Split E2E rows by meaning representation, never by row: an mr's references all go to one
    side, by the same hash as the e2e eval task (`peftkit.evaluation.splits.mr_is_heldout`)."""
    from peftkit.evaluation.splits import mr_is_heldout

    held = [mr_is_heldout(r.fields["mr"], heldout_fraction, seed) for r in rows]
    return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]


# --- tokenisation with completion-only labels ------------------------------------------------


@dataclass
class DataStats:
    """What tokenisation did to a data set; logged and written to the run directory."""

    examples: int = 0
    truncated: int = 0  # completion cut to fit max_length; its end-of-turn tokens kept
    dropped: int = 0  # the prompt alone did not fit max_length
    tokens: int = 0
    trained_tokens: int = 0


def render_pair(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], completion: str) -> tuple[str, str]:
    """(prompt text ending in the assistant header, whole conversation text) via the chat template."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ConfigError("this tokenizer's chat template does not render the prompt as a prefix of the full "
                          "conversation, so the prompt cannot be masked: use a model with a standard chat template")
    return prompt_text, full_text


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: list[dict], completion: str,
                  max_length: int) -> tuple[list[int], list[int], str]:
    """Token ids and labels (prompt tokens -100) of one example, and what truncation did.

    Returns:
        (input_ids, labels, status) with status "ok", "truncated" or "dropped".

    Note: truncation cuts the completion's content but keeps its end-of-turn tokens, so every
    example still teaches the model to stop; cutting them off instead would teach it never to.
    """
    prompt_text, full_text = render_pair(tokenizer, prompt, completion)
    encoded = tokenizer(full_text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    boundary = next((i for i, (start, _) in enumerate(offsets) if start >= len(prompt_text)), len(ids))
    labels = [IGNORE] * boundary + ids[boundary:]
    eos = tokenizer.eos_token_id
    if eos in ids[boundary:]:  # the template's text after the end-of-turn (a newline) is not the answer
        last = len(ids) - 1 - ids[::-1].index(eos)
        labels[last + 1:] = [IGNORE] * (len(ids) - last - 1)
    if len(ids) <= max_length:
        return ids, labels, "ok"
    tail = len(ids) - max(i for i, t in enumerate(ids) if t == eos) if eos in ids[boundary:] else 0
    keep = max_length - tail
    if keep <= boundary:
        return [], [], "dropped"
    return ids[:keep] + ids[len(ids) - tail:], labels[:keep] + labels[len(labels) - tail:], "truncated"


def tokenize_text(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> tuple[list[int], list[int], str]:
    """Plain language modelling: every token trained, EOS appended and kept on truncation."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    status = "ok"
    if len(ids) > max_length:
        ids, status = ids[: max_length - 1] + ids[-1:], "truncated"
    return ids, list(ids), status


def tokenize_rows(tokenizer: PreTrainedTokenizerBase, rows: Iterable[Row], fmt: str,
                  max_length: int) -> tuple[dict[str, list[list[int]]], DataStats]:
    """Columns `input_ids` and `labels` for trl's SFTTrainer (which then pads, or packs)."""
    if fmt not in FORMATS:
        raise ConfigError(f"unknown data format {fmt!r}: use one of {', '.join(FORMATS)}")
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    stats = DataStats()
    for row in rows:
        if fmt == "text":
            (text,) = need_fields(row, "text")
            ids, labels, status = tokenize_text(tokenizer, text, max_length)
        else:
            prompt, completion = PAIR_FORMATS[fmt](row)
            ids, labels, status = tokenize_pair(tokenizer, prompt, completion, max_length)
        if status == "dropped":
            stats.dropped += 1
            continue
        stats.examples += 1
        stats.truncated += status == "truncated"
        stats.tokens += len(ids)
        stats.trained_tokens += sum(label != IGNORE for label in labels)
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
    if stats.truncated or stats.dropped:
        logger.warning("max_length %d: %d examples truncated (end-of-turn kept), %d dropped (prompt too long)",
                       max_length, stats.truncated, stats.dropped)
    return columns, stats
