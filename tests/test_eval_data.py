"""Eval data: readers and their one-line errors, splits, chat labels, specs and data locations."""

from pathlib import Path

import pytest

from peftkit.data import data_root
from peftkit.errors import ConfigError
from peftkit.evaluation import chat_example, load_spec, prepare_specs, split_e2e, split_heldout
from peftkit.evaluation.data import default_data_root, read_alpaca, read_e2e, read_gsm8k, read_sst2
from peftkit.evaluation.prompts import IGNORE_INDEX
from peftkit.evaluation.splits import draw_balanced, group_references
from peftkit.evaluation.tasks.alpaca import alpaca_chat

DATA = data_root()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="needs the data sets (../shared/data or $PEFTKIT_DATA)")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_sst2_reader_either_text_column_and_bad_line(tmp_path):
    rows = read_sst2(write(tmp_path, "a.tsv", "label\tsentence\n1\tgood film\n0\tbad\n"))
    assert rows == [("good film", 1), ("bad", 0)]
    assert read_sst2(write(tmp_path, "b.tsv", "label\tcontent\n1\tfine\n")) == [("fine", 1)]
    path = write(tmp_path, "c.tsv", "label\tsentence\n1\tgood\npositive\tbad label\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: expected label \(0 or 1\)") as exc:
        read_sst2(path)
    assert "\n" not in str(exc.value)


def test_e2e_reader_bad_line(tmp_path):
    assert read_e2e(write(tmp_path, "a.csv", 'mr,ref\n"name[A], food[Thai]","A serves Thai."\n')) == [
        {"mr": "name[A], food[Thai]", "ref": "A serves Thai."}]
    path = write(tmp_path, "b.csv", 'mr,ref\n"name[A]","A."\nname[B], food[Thai],B serves Thai.\n')
    with pytest.raises(ConfigError, match=rf"^{path}:3: expected two non-empty fields"):
        read_e2e(path)
    with pytest.raises(ConfigError, match=r":1: expected the header mr,ref"):
        read_e2e(write(tmp_path, "c.csv", "meaning,text\na,b\n"))


def test_gsm8k_reader_bad_lines(tmp_path):
    good = '{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n'
    assert read_gsm8k(write(tmp_path, "a.jsonl", good))[0]["question"] == "1+1?"
    with pytest.raises(ConfigError, match=r"b.jsonl:2: not valid JSON"):
        read_gsm8k(write(tmp_path, "b.jsonl", good + '{"question": "x", \n'))
    with pytest.raises(ConfigError, match=r"c.jsonl:2: the answer has no '#### <number>'"):
        read_gsm8k(write(tmp_path, "c.jsonl", good + '{"question": "x", "answer": "it is 3"}\n'))


def test_alpaca_reader_list_and_bad_item(tmp_path):
    rows = read_alpaca(write(tmp_path, "a.json", '[{"instruction": "Say hi", "output": "Hi"}]'))
    assert rows == [{"instruction": "Say hi", "input": "", "output": "Hi"}]  # a missing input is empty
    with pytest.raises(ConfigError, match=r"b.json:item 1: expected an object with string fields"):
        read_alpaca(write(tmp_path, "b.json", '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]'))
    with pytest.raises(ConfigError, match=r"c.json:2: not valid JSON"):
        read_alpaca(write(tmp_path, "c.json", '[\n{"instruction": }]'))


def test_split_heldout_deterministic_disjoint():
    train, held = split_heldout(5000, 0.05, seed=42)
    assert len(held) == 250 and not set(train) & set(held) and sorted(train + held) == list(range(5000))
    assert split_heldout(5000, 0.05, seed=42) == (train, held)
    assert split_heldout(5000, 0.05, seed=1)[1] != held


def test_split_e2e_by_mr_never_by_row():
    rows = [{"mr": f"name[R{i % 40}]", "ref": f"ref {i}"} for i in range(400)]
    train, held = split_e2e(rows, 0.2, seed=0)
    assert len(train) + len(held) == 400
    assert not {r["mr"] for r in train} & {r["mr"] for r in held}
    assert 0 < len({r["mr"] for r in held}) < 40
    assert split_e2e(list(reversed(rows)), 0.2, seed=0)[1] == list(reversed(held))  # row order does not matter
    assert all(len(refs) == 10 for _, refs in group_references(held))  # every reference of an mr stays with it


def test_splits_match_the_training_pipeline():
    """Training holds out exactly what the eval tasks score: same fractions, seeds and functions."""
    from peftkit import data, train

    alpaca, e2e = load_spec("alpaca-heldout"), load_spec("e2e")
    assert (train.HELDOUT, train.SPLIT_SEED) == (alpaca.heldout_fraction, alpaca.split_seed)
    assert train.E2E_HELDOUT == e2e.heldout_fraction and e2e.split_seed == 0
    rows = [{"mr": f"name[R{i}], food[F{i % 7}]", "ref": f"r{i}"} for i in range(300)]
    theirs = data.e2e_split([data.Row(fields=r, where=f"x:{i}") for i, r in enumerate(rows)], 0.2)
    ours = split_e2e(rows, 0.2, seed=e2e.split_seed)
    assert [r.fields for r in theirs[1]] == ours[1] and len(ours[1]) > 0


def test_draw_balanced_fixed_seed():
    items = list(range(100))
    labels = [i % 2 for i in items]
    picked = draw_balanced(items, labels, 4, seed=42)
    assert picked == draw_balanced(items, labels, 4, seed=42)
    assert sorted(i % 2 for i in picked) == [0, 0, 1, 1]


def test_chat_example_masks_prompt_counts_end_of_turn(tiny):
    _, tokenizer = tiny
    ids, labels = chat_example(tokenizer, alpaca_chat({"instruction": "Add", "input": "2 and 3", "output": "5"}))
    scored = [t for t in labels if t != IGNORE_INDEX]
    assert tokenizer.decode(scored) == "5<|im_end|>"  # the answer and its end-of-turn token, not the newline
    assert labels[-1] == IGNORE_INDEX and len(ids) == len(labels)
    assert ids[len(ids) - len(scored) - 1:len(ids) - 1] == scored
    assert "2 and 3" in tokenizer.decode(ids[:labels.index(scored[0])])


def test_spec_errors_name_key_and_fix():
    with pytest.raises(ConfigError, match="unknown eval task 'sst3': did you mean 'sst2'"):
        load_spec("sst3")
    with pytest.raises(ConfigError, match="unknown key eval task sst2.shot: did you mean 'shots'"):
        load_spec("sst2", shot=3)
    with pytest.raises(ConfigError, match=r"generation.top_p must be in \(0, 1\]"):
        load_spec("e2e", generation={"top_p": 1.5})
    with pytest.raises(ConfigError, match=r"prompt must be a string that contains \{question\}"):
        load_spec("gsm8k", prompt="Solve it.")


def test_own_task_yaml(tmp_path):
    path = write(tmp_path, "mine.yaml", "task: sst2\ndata: /x/dev.tsv\nlabels: {1: great, 0: awful}\n")
    spec = load_spec(str(path))
    assert spec.name == "mine" and spec.labels == {1: "great", 0: "awful"}
    with pytest.raises(ConfigError, match="has no data key"):
        load_spec(str(write(tmp_path, "nodata.yaml", "task: e2e\n")))
    with pytest.raises(ConfigError, match="task must be one of sst2, e2e, gsm8k, alpaca-heldout"):
        load_spec(str(write(tmp_path, "notask.yaml", "data: x.tsv\n")))


@needs_data
def test_data_root_env_and_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("PEFTKIT_DATA", raising=False)
    assert default_data_root().resolve() == DATA.resolve()
    link = tmp_path / "linked-data"  # a data folder reached through a symlink is the same folder
    link.symlink_to(DATA.resolve(), target_is_directory=True)
    monkeypatch.setenv("PEFTKIT_DATA", str(link))
    assert default_data_root().resolve() == DATA.resolve()
    assert prepare_specs("e2e")[0].data == str(DATA.resolve() / "e2e" / "devset.csv")
    monkeypatch.setenv("PEFTKIT_DATA", str(tmp_path))
    with pytest.raises(ConfigError, match=r"data file .*sst2/dev.tsv does not exist: pass --data"):
        prepare_specs("sst2")
    mine = write(tmp_path, "dev.tsv", "label\tcontent\n1\tnice\n")
    assert prepare_specs("sst2", data_dir=mine)[0].data == str(mine.resolve())
    with pytest.raises(ConfigError, match="is a file, which fits one task, but 2 tasks were given"):
        prepare_specs("sst2,e2e", data_dir=mine)
    assert prepare_specs("e2e", data_dir=DATA)[0].data == str(DATA.resolve() / "e2e" / "devset.csv")
