"""trl's SFTTrainer (language models) and transformers' Trainer (classification heads,
encoder-decoders) with peftkit's run directory: safetensors checkpoints, metrics.jsonl, a
progress bar, and a guard against a diverging loss.

Note: transformers' own checkpoints pickle the optimizer, scheduler and RNG states
(`torch.load`). peftkit reads only safetensors, JSON and YAML, so checkpoints are written in
those formats instead, in the same folder layout, and the Trainer's resume logic (which
reads `trainer_state.json` and skips the batches already seen) is reused unchanged. Each
checkpoint is built in a temp directory and renamed into place, so a process killed while
saving leaves the previous checkpoint intact.
"""

import contextlib
import json
import logging
import random
import re
import resource
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback
from trl import SFTTrainer

from peftkit.atomic import replace_dir
from peftkit.distributed import LAYOUT_FILE
from peftkit.errors import PeftkitError
from peftkit.lm_loss import labelled_loss, supports_labelled_loss
from peftkit.sharding import full, gathered, shard_like, trainable_state

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class TrainingDiverged(PeftkitError):
    """The loss became NaN or infinite."""


class CheckpointFailed(PeftkitError):
    """A checkpoint could not be written (disk full, a file-size limit)."""


WRITE_ERRORS = (OSError, SafetensorError)  # safetensors reports a failed write as its own error


def write_reason(exc: Exception) -> str:
    """Why a write failed, in the system's words ("No space left on device", "File too large")."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc).rsplit("I/O error: ", 1)[-1]


def write_failed(what: str, checkpoint_dir: Path, where: Path, exc: Exception) -> CheckpointFailed:
    """The one-line error for `what` that could not be written under `where`, naming the newest
    intact checkpoint in `checkpoint_dir` that `--resume` continues from."""
    last = latest_resumable(checkpoint_dir)
    kept = f"{last} is intact" if last else "no earlier checkpoint exists"
    return CheckpointFailed(f"could not write {what} ({write_reason(exc)}); {kept}: free space under {where}, then "
                            f"rerun with --resume")


class TrainingInterrupted(PeftkitError):
    """SIGTERM or Ctrl-C stopped training after a checkpoint; `exit_code` is 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal(TrainerCallback):
    """SIGTERM or SIGINT (Ctrl-C): finish the current optimizer step, save a checkpoint, stop.

    A preemptible machine sends SIGTERM and waits a grace period; finishing one step and writing
    one checkpoint (atomically: a temp directory renamed into place) fits it. A second SIGINT
    exits at once (KeyboardInterrupt), leaving the last complete checkpoint as it was. Under data
    parallel every process votes each step (one all-reduce of a flag), so all stop at the same step.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.received = signum
        logger.warning("received %s: finishing this step, then saving a checkpoint (Ctrl-C again to quit now)",
                       signal.Signals(signum).name)

    def on_train_begin(self, args, state, control, **kwargs):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def on_step_end(self, args, state, control, **kwargs):
        stop = self.received is not None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([float(self.received or 0)], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop, self.received = bool(flag.item()), int(flag.item()) or None
        if stop:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        """The signal handlers as they were before training (also after a run that failed)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def peak_memory_mb() -> float:
    """Peak memory since the last `reset_peak_memory`: CUDA allocations, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:  # Linux: VmHWM, which reset_peak_memory can reset (ru_maxrss cannot be)
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024  # KiB
    except (OSError, IndexError, ValueError):
        return process_peak_memory_mb()


def process_peak_memory_mb() -> float:
    """The process's peak RSS over its whole life (loading included)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def reset_peak_memory() -> None:
    """Start `peak_memory_mb` afresh: so that training's peak is not the loading's (a QLoRA base is
    read in full precision, then quantised)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
    except OSError:
        logger.debug("cannot reset the peak RSS here: peak_memory_mb includes loading")


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_problem(directory: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a file missing, truncated or corrupted); None if intact."""
    weights = directory / "trainable.safetensors"
    if not weights.is_file():  # a checkpoint of an older peftkit holds the saved adapter instead
        weights = directory / "adapter" / "adapter_model.safetensors"
    for path in (directory / "trainer_state.json", directory / "optimizer.json", directory / "scheduler.json",
                 directory / "optimizer.safetensors", weights):
        if not path.is_file():
            return f"{path.relative_to(directory)} is missing"
        try:
            json.loads(path.read_text()) if path.suffix == ".json" else load_file(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read means: do not resume from it
            return f"{path.relative_to(directory)} is unreadable ({type(exc).__name__})"
    return None


def latest_resumable(directory: Path) -> Path | None:
    """The newest intact checkpoint; each newer damaged one is named in a warning and skipped."""
    for checkpoint in reversed(checkpoints(directory)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        logger.warning("skipping %s: %s; resuming from an older checkpoint", checkpoint, problem)
    return None


class ProgressBar(TrainerCallback):
    """One bar over optimiser steps, with loss and tokens/s; ETA from tqdm."""

    def __init__(self) -> None:
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{logs.get('tokens_per_s', 0):.0f}")

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


@torch.no_grad()
def load_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], directory: Path) -> None:
    """Every trainable tensor back from a checkpoint, by name, as it was in memory (a saved adapter
    may differ: AdaLoRA keeps the surviving ranks only, PiSSA is converted to plain LoRA)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != tensors.keys() or any(params[n].shape != t.shape for n, t in tensors.items()):
        raise PeftkitError(f"{directory}/trainable.safetensors does not fit this run's adapter: resume with the "
                           f"recipe that wrote it")
    for name, tensor in tensors.items():
        params[name].copy_(shard_like(tensor, params[name]))


class AllocatorCallback(TrainerCallback):
    """Runs a method's allocator (AdaLoRA's rank budget) after every optimizer step, before the
    gradients are cleared; the step is 0-based, as in peft's examples."""

    def __init__(self, allocator) -> None:
        self.allocator = allocator

    def on_train_begin(self, args, state, control, **kwargs):
        self.allocator.begin(state.max_steps)

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.allocator.update_and_allocate(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.allocator.finish()


class RunDirectory:
    """What peftkit adds to a transformers Trainer: its run directory; `save_adapter(model, dir)`
    saves the adapter, `load_adapter_weights(model, dir)` restores it on resume.

    Every checkpoint holds the trainable tensors as they are in memory (`trainable.safetensors`),
    which resume reads, beside the adapter as saved (`adapter/`). A method may add a loss term
    (`regularization(model)`, AdaLoRA's orthogonality penalty) and an `allocator` run after each
    optimizer step; the allocator's state goes into every checkpoint (`allocator.safetensors` +
    `.json`) and comes back on resume.
    """

    def __init__(self, *args, run_dir: Path, save_adapter, load_adapter_weights, optimizer_factory=None,
                 regularization=None, allocator=None, checkpoint_copy: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint_copy = checkpoint_copy  # a saved copy (adapter/) in each checkpoint; full fine-tuning: none
        self.optimizer_factory = optimizer_factory  # (model, args) -> optimizer, e.g. LoRA+'s groups
        self.regularization = regularization  # model -> a loss term or None
        self.allocator = allocator
        if allocator is not None:
            self.add_callback(AllocatorCallback(allocator))
        self.run_dir = Path(run_dir)
        self.save_adapter_fn = save_adapter
        self.load_adapter_weights_fn = load_adapter_weights
        self.remove_callback(ProgressCallback)
        self.progress = ProgressBar()
        self.add_callback(self.progress)
        self.stopper = StopOnSignal()
        self.add_callback(self.stopper)
        self._last_log = (time.perf_counter(), 0)

    @contextlib.contextmanager
    def _defer_fsdp_gradient_reduction(self):
        """Gradient accumulation on a sharded model: one reduce-scatter per optimizer step, after the
        last micro-batch (transformers' own version reads a config only its load-time sharding sets)."""
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # an error ends the bar first, so its message starts a line of its own
            if self.progress.bar is not None:
                self.progress.bar.close()
                self.progress.bar = None
            self.stopper.restore()  # on_train_end does not run when training raises

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.optimizer_factory is not None:
            self.optimizer = self.optimizer_factory(self.model if model is None else model, self.args)
        return super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs:
            loss, outputs = result
            return self.regularized(model, loss), outputs
        return self.regularized(model, result)

    def regularized(self, model, loss: torch.Tensor) -> torch.Tensor:
        """The loss plus the method's own term, if it has one."""
        term = None
        if self.regularization is not None and model.training:
            term = self.regularization(self.accelerator.unwrap_model(model))
        return loss if term is None else loss + term

    # --- divergence -------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not torch.isfinite(loss).all():
            last = checkpoints(Path(self.args.output_dir))
            kept = f"last good checkpoint: {last[-1]}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss became {loss.item()} at step {self.state.global_step + 1}; {kept}: lower "
                                   f"train.lr or enable train.max_grad_norm, then rerun (or --resume)")
        return loss

    # --- metrics.jsonl ----------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            now, tokens = time.perf_counter(), self.state.num_input_tokens_seen
            last_time, last_tokens = self._last_log
            logs["tokens_per_s"] = (tokens - last_tokens) / max(now - last_time, 1e-9)
            logs["peak_memory_mb"] = peak_memory_mb()
            self._last_log = (now, tokens)
        super().log(logs, start_time)
        if "loss" in logs and self.args.should_save:
            keep = ("epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "peak_memory_mb")
            record = {"step": self.state.global_step, **{k: logs[k] for k in keep if k in logs}}
            record["lr"] = record.pop("learning_rate", None)
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    # --- checkpoints in safetensors + JSON ----------------------------------------------------
    def _save_checkpoint(self, model, trial) -> None:
        try:
            self._write_checkpoint(model)
        except WRITE_ERRORS as exc:  # disk full, quota, file-size limit: the earlier checkpoints are untouched
            root = Path(self.args.output_dir)
            shutil.rmtree(root / f".checkpoint-{self.state.global_step}.tmp", ignore_errors=True)
            raise write_failed(f"the checkpoint of step {self.state.global_step}", root, root, exc) from None

    def _write_checkpoint(self, model) -> None:
        root = Path(self.args.output_dir)
        final = root / f"checkpoint-{self.state.global_step}"
        tmp = root / f".checkpoint-{self.state.global_step}.tmp"
        if self.args.should_save:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._save_rng(tmp)
        model = self.accelerator.unwrap_model(model)
        trainable = trainable_state(model)  # whole tensors: every process takes part when they are sharded
        optimizer_tensors, optimizer_meta = self._optimizer_state()
        with gathered(model):
            if self.args.should_save and self.checkpoint_copy:
                self.save_adapter_fn(model, tmp / "adapter")
        if self.args.should_save:
            save_file(optimizer_tensors, tmp / "optimizer.safetensors")
            (tmp / "optimizer.json").write_text(json.dumps(optimizer_meta))
            (tmp / "scheduler.json").write_text(json.dumps(self.lr_scheduler.state_dict()))
            save_file(trainable, tmp / "trainable.safetensors")
            if self.allocator is not None:
                tensors, meta = self.allocator.state()
                save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / "allocator.safetensors")
                (tmp / "allocator.json").write_text(json.dumps(meta))
            self.state.save_to_json(str(tmp / "trainer_state.json"))
            layout = {"processes": self.args.world_size, "batch_size": self.args.per_device_train_batch_size,
                      "grad_accum": self.args.gradient_accumulation_steps,
                      "distributed": "fsdp" if self.is_distributed_loading_by_transformers else "ddp"}
            (tmp / LAYOUT_FILE).write_text(json.dumps(layout) + "\n")
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            replace_dir(tmp, final)  # signals wait for the renames: the old checkpoint or the new, whole
            for old in checkpoints(root)[: -self.args.save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def _optimizer_state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The optimizer's tensors (whole, on the CPU, by `<param index>.<name>`) and the rest as JSON.
        Sharded state is gathered, so every process calls this and a run resumes into any process count."""
        state = self.optimizer.state_dict()
        tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
        for index, values in state["state"].items():
            meta["state"][str(index)] = {}
            for key, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"{index}.{key}"] = full(value.detach()).contiguous().cpu()
                else:
                    meta["state"][str(index)][key] = value
        return tensors, meta

    def _save_rng(self, directory: Path) -> None:
        rank = self.args.process_index
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        meta = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}
        (directory / f"rng_{rank}.json").write_text(json.dumps(meta))
        tensors = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            tensors["cuda"] = torch.cuda.get_rng_state()
        save_file(tensors, directory / f"rng_{rank}.safetensors")

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        model = model if model is not None else self.model
        directory = Path(resume_from_checkpoint)
        if (directory / "trainable.safetensors").is_file():
            load_trainable(model, self._load_tensors(directory / "trainable.safetensors"), directory)
        else:  # a checkpoint of an older peftkit
            self.load_adapter_weights_fn(model, directory / "adapter")
        if self.allocator is not None:
            self.allocator.load_state(self._load_tensors(directory / "allocator.safetensors"),
                                      json.loads((directory / "allocator.json").read_text()))

    def _load_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        """A checkpoint's tensors on this process's device (safetensors names no "cpu:N" device)."""
        return {name: tensor.to(self.args.device) for name, tensor in load_file(path).items()}

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is None:
            return
        directory = Path(checkpoint)
        meta = json.loads((directory / "optimizer.json").read_text())
        tensors = self._load_tensors(directory / "optimizer.safetensors")
        state = {int(i): dict(values) for i, values in meta["state"].items()}
        params = [p for group in self.optimizer.param_groups for p in group["params"]]  # state_dict's indexing
        for key, tensor in tensors.items():
            index, name = key.split(".", 1)
            param = params[int(index)]
            state.setdefault(int(index), {})[name] = shard_like(tensor, param) if tensor.shape == param.shape else tensor
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.lr_scheduler.load_state_dict(json.loads((directory / "scheduler.json").read_text()))

    def _load_rng_state(self, checkpoint) -> None:
        if checkpoint is None:
            return
        directory, rank = Path(checkpoint), self.args.process_index
        if not (directory / f"rng_{rank}.json").is_file():
            logger.warning("no RNG state for process %d in %s: the resumed run may differ", rank, directory)
            return
        meta = json.loads((directory / f"rng_{rank}.json").read_text())
        version, internal, gauss = meta["python"]
        random.setstate((version, tuple(internal), gauss))
        name, keys, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        tensors = load_file(directory / f"rng_{rank}.safetensors")
        torch.set_rng_state(tensors["cpu"])
        if "cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["cuda"])

    def _load_scaler(self, checkpoint) -> None:
        """fp16 loss scaling restarts from its default on resume (bf16 and fp32 need none)."""

    def _save_scaler(self, output_dir) -> None:
        """See `_load_scaler`."""


class PeftkitTrainer(RunDirectory, SFTTrainer):
    """trl's SFTTrainer (causal language models) writing peftkit's run directory.

    With `labels_only`, the loss runs the LM head on the labelled positions only
    (`peftkit.lm_loss`), logging the same metrics as trl's loss (entropy, mean token accuracy,
    tokens); trl's own loss serves models it does not cover and label smoothing or custom losses.
    """

    def __init__(self, *args, labels_only: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.labels_only = labels_only and supports_labelled_loss(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if (not self.labels_only or return_outputs or self.compute_loss_func is not None
                or self.label_smoother is not None or self.args.loss_type != "nll" or self.aux_loss_enabled):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        out = labelled_loss(model, inputs, num_items_in_batch)
        loss = self.regularized(model, out.loss)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as trl: DDP averages gradients
        gather = self.accelerator.gather_for_metrics
        valid = gather(torch.as_tensor(out.log_probs.numel(), device=loss.device)).sum()
        entropy, correct = gather(out.entropy.sum()).sum(), gather(out.correct.sum()).sum()
        self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train":
            tokens = inputs["attention_mask"].sum() if "attention_mask" in inputs else torch.as_tensor(
                inputs["position_ids"].size(1), device=loss.device)
            self._total_train_tokens += gather(tokens).sum().item() // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss


class TaskTrainer(RunDirectory, Trainer):
    """transformers' Trainer (seq-cls heads, seq2seq models: the model computes its own loss)
    writing peftkit's run directory."""
