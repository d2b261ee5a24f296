"""The selection split: a dev split carved from a run's own training data, scored while it trains.

A recipe's `selection` section names a metric (`sst2/accuracy`: an eval task and one of its
metrics). The run then holds out `dev_fraction` of the training rows of the data that task
scores (seeded; E2E by meaning representation, so no mr is on both sides), never trains on
them, and scores them `points` times, evenly spread, the last at the end of training:

    runs/<name>/selection/dev.tsv     the dev rows, in the task's own file format
    runs/<name>/selection.json        the split, and each point's step, value and per-example scores

Studies tune on it (the last point's value is a trial's score, `peftkit.tune`) and read
convergence from it (`still_rising`): the eval tasks' own data is never read here.
"""

import csv
import io
import json
import logging
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from transformers import PreTrainedTokenizerBase, TrainerCallback

from peftkit.errors import ConfigError
from peftkit.evaluation.spec import TaskSpec
from peftkit.evaluation.splits import mr_is_heldout, split_heldout

logger = logging.getLogger(__name__)

RISING = 0.95  # P(last point beats the one a third of training earlier) above which a run still rises


def parse_metric(metric: Any, key: str) -> tuple[str, str]:
    """`sst2/accuracy` -> ("sst2", "accuracy"), both checked against the shipped eval tasks.

    Raises:
        ConfigError: not `task/metric`, an unknown task, or a metric the task does not produce.
    """
    from peftkit.evaluation import task_names

    task, _, name = metric.partition("/") if isinstance(metric, str) else ("", "", "")
    known = task_names()
    if task not in known or not name:
        raise ConfigError(f"{key}: expected <eval task>/<metric> with a task of {', '.join(known)} (e.g. "
                          f"sst2/accuracy), got {metric!r}")
    produced = task_module(task).METRICS
    if name not in produced:
        raise ConfigError(f"{key}: the {task} task produces {', '.join(produced)}, not {name!r}")
    return task, name


def task_module(task: str) -> ModuleType:
    """The implementation module of a shipped eval task (`peftkit.evaluation.tasks`)."""
    from peftkit.evaluation.spec import load_spec
    from peftkit.evaluation.tasks import TASKS

    return TASKS[load_spec(task).task]


def dev_format(metric: str) -> str:
    """The training data format whose rows the metric's task scores (sst2, e2e, alpaca, gsm8k)."""
    return task_module(metric.partition("/")[0]).TRAIN_FORMAT


def split_dev(rows: list, fmt: str, fraction: float, seed: int) -> tuple[list, list]:
    """(rows to train on, dev rows) of one source's training rows, each in file order.

    E2E rows are split by meaning representation (a hash of the seed and the mr, as the eval
    split but salted apart from it), so a dev mr never appears in training; other formats by row.
    """
    if fmt == "e2e":
        held = [mr_is_heldout(row.fields["mr"], fraction, f"dev:{seed}") for row in rows]
        return [r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h]
    if len(rows) < 2:
        raise ConfigError(f"selection.dev_fraction: cannot carve a dev split from {len(rows)} training row(s): "
                          f"raise data.limit or drop the selection")
    train_idx, dev_idx = split_heldout(len(rows), fraction, seed)
    return [rows[i] for i in train_idx], [rows[i] for i in dev_idx]


def write_dev(rows: list, fmt: str, directory: Path) -> Path:
    """The dev rows as a file the eval task reads (the format of the task's own data)."""
    from peftkit.data import need_fields, sst2_fields

    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "sst2":
        path = directory / "dev.tsv"
        lines = ["label\tsentence"] + [f"{label}\t{' '.join(text.split())}" for text, label in map(sst2_fields, rows)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "e2e":
        path, buffer = directory / "dev.csv", io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["mr", "ref"])
        writer.writerows(need_fields(row, "mr", "ref") for row in rows)
        path.write_text(buffer.getvalue(), encoding="utf-8")
    elif fmt in ("alpaca", "gsm8k"):
        keys = ("instruction", "input", "output") if fmt == "alpaca" else ("question", "answer")
        path = directory / "dev.jsonl"
        records = [{k: row.fields.get(k) or "" for k in keys} for row in rows]
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        raise ConfigError(f"selection: no eval task scores {fmt} rows: select a metric of sst2, e2e, gsm8k or "
                          f"alpaca-heldout")
    return path


def dev_spec(metric: str, path: Path, rows: int) -> TaskSpec:
    """The metric's task spec, scoring every row of the dev file (none of the task's own data)."""
    from peftkit.evaluation.spec import load_spec

    task = metric.partition("/")[0]
    return load_spec(task, data=str(path.resolve()), **task_module(task).whole_file(rows))


def steps_at(total: int, points: int) -> list[int]:
    """`points` optimiser steps spread evenly over `total`, the last one `total`."""
    return sorted({max(1, round(total * k / points)) for k in range(1, points + 1)})


class SelectionCallback(TrainerCallback):
    """Scores the dev split at its steps (on the main process) and rewrites selection.json after
    each point. `seconds`: the time all kept points took; `process_seconds`: this process's share,
    which `peftkit.train.write_system` leaves out of the run's speed."""

    def __init__(self, record: dict, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, path: Path,
                 points: int) -> None:
        self.record, self.spec, self.tokenizer, self.path, self.points = record, spec, tokenizer, path, points
        self.steps: list[int] = []

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.steps = steps_at(state.max_steps, self.points)
        if self.path.is_file():  # resumed: the points scored before the checkpoint stay
            earlier = json.loads(self.path.read_text())
            self.record["points"] = [p for p in earlier["points"] if p["step"] <= state.global_step]
        self.record["process_seconds"] = 0.0
        self._write()

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        if state.global_step not in self.steps:
            return
        from peftkit.evaluation.runner import run_task

        started = time.perf_counter()
        result = run_task(model, self.tokenizer, self.spec, None, progress=False)
        value = float(result.metrics[self.record["metric"].partition("/")[2]])
        spent = time.perf_counter() - started
        self.record["points"].append({"step": state.global_step, "value": value, "seconds": spent,
                                      "scores": result.scores})
        self.record["process_seconds"] += spent
        logger.info("selection %s at step %d: %.4g", self.record["metric"], state.global_step, value)
        self._write()

    def _write(self) -> None:
        self.record["seconds"] = sum(p.get("seconds", 0.0) for p in self.record["points"])
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.record) + "\n")
        tmp.replace(self.path)


def selection_callback(recipe, dev_rows: list, tokenizer, out: Path) -> SelectionCallback | None:
    """The callback of a recipe with a selection section (None without one), its dev file written."""
    s = recipe.selection
    if not s.metric:
        return None
    fmt = dev_format(s.metric)
    dev_file = write_dev(dev_rows, fmt, out / "selection")
    record = {"metric": s.metric, "split": {"source_format": fmt, "fraction": s.dev_fraction, "seed": s.seed,
                                           "size": len(dev_rows), "file": str(dev_file.relative_to(out))},
              "points": [], "seconds": 0.0}
    spec = dev_spec(s.metric, dev_file, len(dev_rows))
    return SelectionCallback(record, spec, tokenizer, out / "selection.json", s.points)


def read_selection(run_dir: Path) -> dict | None:
    """A run's selection.json (None when it scored no dev split)."""
    path = Path(run_dir) / "selection.json"
    return json.loads(path.read_text()) if path.is_file() else None


def final_score(record: dict | None) -> float | None:
    """The dev metric at the end of training (a tuning trial's score) of a selection.json; None if
    it scored no point."""
    return record["points"][-1]["value"] if record and record["points"] else None


def still_rising(records: list[dict], resamples: int = 1000, seed: int = 0) -> bool | None:
    """Whether the dev metric still rose over the last third of training: the last point beats the
    point nearest two thirds of the way, in at least 95 % of bootstrap draws paired over the dev
    examples and the seeds (each draw resamples both once, for both points). `records`: each
    seed's selection.json. None if it cannot be told (fewer than two points, no statistics)."""
    from peftkit import stats

    metric = records[0]["metric"].partition("/")[2] if records else ""
    ends, earlier = [], []
    for record in records:
        points = record.get("points") or []
        if len(points) < 2 or not stats.supports(metric, points[-1]["scores"]):
            return None
        last = points[-1]["step"]
        before = min(points[:-1], key=lambda p: abs(p["step"] - 2 * last / 3))
        ends.append(points[-1]["scores"])
        earlier.append(before["scores"])
    if not ends:
        return None
    try:
        matrix = stats.bootstrap_matrix(metric, [ends, earlier], resamples, seed, paired_seeds=True)
    except ValueError:  # the points scored different examples
        return None
    return stats.probability_better(matrix, metric, 0, 1) >= RISING
