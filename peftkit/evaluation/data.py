"""Eval data on disk: where the data root is, and readers for each task's file format.

The data root is `$PEFTKIT_DATA`, else `../shared/data` beside the repository when it exists;
`--data` overrides both. Any file of the same format works: a bad row is a one-line error that
names the file and the line.

    sst2      TSV with a header: `label` (0 or 1; 1 = positive) and one text column
    e2e       CSV with a header: `mr,ref`; several rows may share one `mr`
    gsm8k     JSON lines `{question, answer}`; the final answer follows `####`
    alpaca    a JSON list (or JSON lines) of `{instruction, input, output}`
"""

import csv
import json
import os
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError


def default_data_root() -> Path | None:
    """`$PEFTKIT_DATA`, else the `shared/data` folder training reads (`peftkit.data.data_root`)
    when it exists, else None."""
    from peftkit.data import data_root

    root = data_root()
    return root if os.environ.get("PEFTKIT_DATA") or root.is_dir() else None


def resolve_file(relative: str, root: Path | None, task: str) -> Path:
    """An absolute path for a spec's data entry; a one-line error if it is not there."""
    path = Path(relative).expanduser()
    if not path.is_absolute():
        if root is None:
            raise ConfigError(f"eval task {task} needs {relative} but no data root is set: set PEFTKIT_DATA or "
                              f"pass --data DIR (a folder holding {relative})")
        path = root / path
    if not path.is_file():
        raise ConfigError(f"eval task {task}: data file {path} does not exist: pass --data with the folder "
                          f"that holds {relative}, or a path to the file itself")
    return path


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}): check the file") from None


def read_sst2(path: Path) -> list[tuple[str, int]]:
    """(text, label) rows of an SST-2 TSV: a header with `label` and one text column."""
    lines = _lines(path)
    header = lines[0].split("\t") if lines else []
    if len(header) != 2 or "label" not in header:
        raise ConfigError(f"{path}:1: expected a header of two tab-separated columns, one named label "
                          f"(e.g. label<TAB>sentence), got {lines[0][:60]!r}" if lines else f"{path} is empty")
    label_col = header.index("label")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2 or fields[label_col].strip() not in ("0", "1") or not fields[1 - label_col].strip():
            raise ConfigError(f"{path}:{number}: expected label (0 or 1) and text separated by one tab, "
                              f"got {line[:60]!r}")
        rows.append((fields[1 - label_col].strip(), int(fields[label_col])))
    if not rows:
        raise ConfigError(f"{path} has a header but no rows: point to a file with examples")
    return rows


def read_e2e(path: Path) -> list[dict[str, str]]:
    """`{mr, ref}` rows of an E2E CSV, in file order."""
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise ConfigError(f"cannot read {path} ({exc}): check the file") from None
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader, None)
            if header != ["mr", "ref"]:
                raise ConfigError(f"{path}:1: expected the header mr,ref, got {','.join(header or [])[:60]!r}")
            rows = []
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != 2 or not fields[0].strip() or not fields[1].strip():
                    raise ConfigError(f"{path}:{reader.line_num}: expected two non-empty fields mr,ref, "
                                      f"got {len(fields)} field(s): quote fields that contain commas")
                rows.append({"mr": fields[0].strip(), "ref": fields[1].strip()})
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}:{reader.line_num}: not valid CSV ({exc}): fix the quoting") from None
    if not rows:
        raise ConfigError(f"{path} has no rows: point to an mr,ref CSV with examples")
    return rows


def _json_record(path: Path, where: str, text_or_obj: Any, keys: tuple[str, ...]) -> dict[str, str]:
    record = text_or_obj
    if isinstance(record, str):
        try:
            record = json.loads(record)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{where}: not valid JSON ({exc.msg}): fix or remove the line") from None
    if not isinstance(record, dict) or any(not isinstance(record.get(k), str) for k in keys):
        raise ConfigError(f"{path}:{where}: expected an object with string fields {', '.join(keys)}")
    return {k: record[k] for k in keys}


def read_jsonl(path: Path, keys: tuple[str, ...]) -> list[dict[str, str]]:
    """Records of a JSON-lines file, each with the given string fields."""
    rows = [_json_record(path, str(number), line, keys)
            for number, line in enumerate(_lines(path), start=1) if line.strip()]
    if not rows:
        raise ConfigError(f"{path} is empty: point to a JSON-lines file with {', '.join(keys)} records")
    return rows


def read_gsm8k(path: Path) -> list[dict[str, str]]:
    """`{question, answer}` records; every answer must carry its final value after `####`."""
    rows = read_jsonl(path, ("question", "answer"))
    for number, row in enumerate(rows, start=1):
        if "####" not in row["answer"]:
            raise ConfigError(f"{path}:{number}: the answer has no '#### <number>' final answer: "
                              f"end each answer with '#### ' and the number")
    return rows


def read_alpaca(path: Path) -> list[dict[str, str]]:
    """`{instruction, input, output}` records of a JSON list, or of JSON lines for `.jsonl` files."""
    keys = ("instruction", "input", "output")
    if path.suffix == ".jsonl":
        return read_jsonl(path, keys)
    try:
        data = json.loads("\n".join(_lines(path)))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}): fix the file") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path} must hold a non-empty JSON list of {{instruction, input, output}} objects")
    return [_json_record(path, f"item {index}", {"input": "", **item} if isinstance(item, dict) else item, keys)
            for index, item in enumerate(data)]
