"""Data: formats, completion-only labels checked token by token, truncation keeping the
end-of-turn, deterministic splits (E2E by meaning representation), packing, bad rows."""

import json
from pathlib import Path

import pytest
import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

import peftkit
from peftkit.data import IGNORE, Row, data_root, e2e_split, read_rows, tokenize_pair, tokenize_rows
from peftkit.evaluation.splits import split_heldout
from peftkit.errors import ConfigError

SHARED = data_root()


def test_labels_mask_prompt_token_by_token(tiny):
    _, tok = tiny
    prompt = [{"role": "user", "content": "Name a colour."}]
    ids, labels, status = tokenize_pair(tok, prompt, "Blue.", max_length=512)
    prompt_ids = tok(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)["input_ids"]
    completion_ids = tok("Blue.<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert status == "ok" and ids == prompt_ids + completion_ids
    # the answer and its end-of-turn are trained; the template's newline after it is not
    assert labels == [IGNORE] * len(prompt_ids) + completion_ids[:-1] + [IGNORE]
    assert tok.eos_token_id in [label for label in labels if label != IGNORE]  # the model learns to stop


@pytest.mark.slow
def test_labels_with_real_tokenizer(smol):
    _, tok = smol
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    ids, labels, _ = tokenize_pair(tok, prompt, "4", max_length=512)
    trained = [label for label in labels if label != IGNORE]
    assert tok.decode(trained) == "4<|im_end|>"
    assert tok.decode(ids[: len(ids) - len(trained) - 1]).endswith("<|im_start|>assistant\n")
    assert trained[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_truncation_keeps_end_of_turn(tiny):
    _, tok = tiny
    prompt = [{"role": "user", "content": "Say a lot."}]
    full, _, _ = tokenize_pair(tok, prompt, "word " * 50, max_length=10_000)
    ids, labels, status = tokenize_pair(tok, prompt, "word " * 50, max_length=len(full) - 20)
    assert status == "truncated" and len(ids) == len(full) - 20
    assert ids[-2:] == [tok.eos_token_id, tok("\n")["input_ids"][0]] and labels[-2] == tok.eos_token_id
    _, _, status = tokenize_pair(tok, [{"role": "user", "content": "x" * 300}], "y", max_length=64)
    assert status == "dropped"


def test_tokenize_rows_counts(tiny):
    _, tok = tiny
    rows = [Row({"instruction": "Repeat", "input": "ab" * n, "output": "ab" * n}, f"f:{n}") for n in (1, 40, 200)]
    columns, stats = tokenize_rows(tok, rows, "alpaca", max_length=200)
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 1, 1)
    assert all(len(ids) <= 200 for ids in columns["input_ids"])
    assert stats.trained_tokens == sum(sum(label != IGNORE for label in labels) for labels in columns["labels"])


@pytest.mark.parametrize("name,fmt,first", [
    ("alpaca/alpaca_5000.json", "alpaca", "Are the two sentences below grammatically correct?"),
    ("sst2/train.tsv", "sst2", "Classify the sentiment"),
    ("e2e/devset.csv", "e2e", "Write a short restaurant description"),
    ("gsm8k/train.jsonl", "gsm8k", "Natalia sold clips"),
])
def test_shared_files_in_every_format(tiny, name, fmt, first):
    rows = read_rows(SHARED / name)[:5]
    columns, stats = tokenize_rows(tiny[1], rows, fmt, max_length=1024)
    assert stats.examples == 5
    text = tiny[1].decode(columns["input_ids"][0])
    assert first in text and text.endswith("<|im_end|>\n")


def test_chat_and_text_formats(tiny, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n"
                    + json.dumps({"text": "plain"}) + "\n")
    rows = read_rows(path)
    columns, _ = tokenize_rows(tiny[1], rows[:1], "chat", 512)
    assert tiny[1].decode([t for t in columns["labels"][0] if t != IGNORE]) == "hello<|im_end|>"
    columns, _ = tokenize_rows(tiny[1], rows[1:], "text", 512)
    assert columns["labels"][0] == columns["input_ids"][0] and columns["input_ids"][0][-1] == tiny[1].eos_token_id


@pytest.mark.parametrize("suffix,content,where", [
    (".jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n', ":2"),
    (".jsonl", '{"instruction": "a", "output": "b"}\n{broken\n', ":2"),
    (".json", '[\n{"instruction": "a", "output": "b"},\n{"instruction": 3, "output": "b"}\n]', ":3 (item 2)"),
    (".csv", "mr,ref\nname[A],fine\nname[B]\n", ":3"),
])
def test_malformed_row_names_file_and_line(tiny, tmp_path, suffix, content, where):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    fmt = "e2e" if suffix == ".csv" else "alpaca"
    with pytest.raises(ConfigError) as exc:
        tokenize_rows(tiny[1], read_rows(path), fmt, 512)
    assert f"{path}{where}" in str(exc.value) and "\n" not in str(exc.value)


def test_missing_and_unknown_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_rows(tmp_path / "nope.json")
    (tmp_path / "data.parquet").write_text("x")
    with pytest.raises(ConfigError, match=r"\.json, \.jsonl, \.csv or \.tsv"):
        read_rows(tmp_path / "data.parquet")


def test_e2e_split_by_meaning_representation():
    rows = read_rows(SHARED / "e2e/devset.csv")
    train, held = e2e_split(rows, 0.2)
    assert len(train) + len(held) == len(rows) == 4672
    train_mrs, held_mrs = {r.fields["mr"] for r in train}, {r.fields["mr"] for r in held}
    assert not train_mrs & held_mrs and len(train_mrs | held_mrs) == 547
    assert 0.12 < len(held_mrs) / 547 < 0.28
    again, _ = e2e_split(list(reversed(rows)), 0.2)
    assert {r.fields["mr"] for r in again} == train_mrs  # independent of row order


def test_split_heldout_is_deterministic():
    a, b = split_heldout(5000, 0.05, seed=42), split_heldout(5000, 0.05, seed=42)
    assert a == b and len(a[1]) == 250 and not set(a[0]) & set(a[1])
    assert split_heldout(5000, 0.05, seed=1)[1] != a[1]


def test_packed_batch_loss_equals_unpacked(tiny):
    """Packed examples never attend to each other: position ids restart per example."""
    model, tok = tiny
    peftkit.apply_adapter(model, "lora")
    rows = [Row({"instruction": f"Count to {n}", "input": "", "output": " ".join(map(str, range(n)))}, "t")
            for n in (3, 7, 12)]
    columns, _ = tokenize_rows(tok, rows, "alpaca", 512)
    examples = [{"input_ids": i, "labels": l} for i, l in zip(columns["input_ids"], columns["labels"])]
    packed = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(examples)
    padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        # use_cache=False as trl's SFTTrainer passes: with a cache, transformers skips packed-sequence masks
        packed_loss = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                            labels=packed["labels"], use_cache=False).loss
        padded_loss = model(**padded).loss
    assert abs(packed_loss.item() - padded_loss.item()) <= 1e-5
