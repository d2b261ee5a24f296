"""Shared timing helpers for benchmarks: interleaved repetitions, medians, a JSON record."""

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def bench_args(doc: str | None, seq: int = 256, new_tokens: int | None = None,
               completion: float | None = None) -> argparse.Namespace:
    """The options every benchmark takes: model, repetitions, batch shape (and generation length,
    and the labelled fraction of completion-only batches)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=seq)
    if new_tokens is not None:
        parser.add_argument("--new-tokens", type=int, default=new_tokens)
    if completion is not None:
        parser.add_argument("--completion", type=float, default=completion,
                            help="fraction of each row (its end) that has labels")
    return parser.parse_args()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(cases: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per case; the cases take turns so drift hits them all alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def train_step(model: torch.nn.Module, batch: torch.Tensor, labels: torch.Tensor | None = None,
               labels_only: bool = False) -> Callable[[], None]:
    """One forward + backward + AdamW step on `batch`; no optimiser if nothing trains.

    labels: (batch, seq), -100 where nothing is scored; None: the inputs themselves.
    labels_only: the loss on labelled positions only (`peftkit.lm_loss.labelled_loss`, what
        `peftkit train` runs), else the model's own loss over every position's logits.
    """
    from peftkit.lm_loss import labelled_loss

    labels = batch if labels is None else labels
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step() -> None:
        if labels_only:
            loss = labelled_loss(model, {"input_ids": batch, "labels": labels}).loss
        else:
            loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def write_record(name: str, record: dict) -> Path:
    import peft
    import transformers

    record = {"machine": {"platform": platform.platform(), "cpu_threads": torch.get_num_threads(),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__}, **record}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
