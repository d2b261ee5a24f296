"""eval.json on disk, and the table the CLI prints.

eval.json (see `evaluate_model` for its fields) is merged task by task: evaluating more tasks of
the same model and adapter later adds them to the file rather than dropping the earlier ones.
"""

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from peftkit.atomic import temp_path
from peftkit.errors import PeftkitError

logger = logging.getLogger(__name__)

UNSCALED = ("loss", "perplexity")  # metrics that are not percentages


LOCATIONS = ("source", "path")  # where a model or adapter was loaded from: not part of what it is


def _identity(entry: Any) -> Any:
    return {k: v for k, v in entry.items() if k not in LOCATIONS} if isinstance(entry, dict) else entry


def _same_subject(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return all(_identity(old.get(k)) == _identity(new.get(k)) for k in ("model", "adapter"))


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write eval.json atomically; tasks of an existing file for the same model and adapter are kept.

    Raises:
        PeftkitError: the file cannot be written.
    """
    path = Path(path)
    merged = report
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict) and _same_subject(old, report) and isinstance(old.get("tasks"), dict):
            merged = {**report, "tasks": {**old["tasks"], **report["tasks"]}}
        else:
            logger.info("replacing %s: it holds results of another model or adapter", path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(merged, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise PeftkitError(f"cannot write {path} ({exc}): pass --out with a writable path") from None
    finally:  # a failed or interrupted write leaves no temp file behind
        tmp.unlink(missing_ok=True)
    return path


def _value(name: str, value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if name in UNSCALED else f"{value:.2f}"


def format_table(report: dict[str, Any]) -> str:
    """A plain-text table: one row per task with its shots, examples, metrics and seconds."""
    rows = [("task", "shots", "n", "metrics", "seconds")]
    for name, task in report["tasks"].items():
        shots = task["settings"].get("shots")
        metrics = "  ".join(f"{k} {_value(k, v)}" for k, v in task["metrics"].items()) or f"skipped: {task.get('skipped')}"
        seconds = f"{task['seconds']:.1f}" + (" (cached)" if task.get("cached") else "")
        rows.append((name, "-" if shots is None else str(shots), str(task["n"]), metrics, seconds))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i in (1, 2) else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join(line.rstrip() for line in lines)
