"""One training run: recipe -> model -> adapter -> data -> trl SFTTrainer -> run directory.

    runs/<name>/
      recipe.yaml      the fully resolved recipe
      adapter/         the trained adapter (peft's format) with its model card
      checkpoints/     resumable checkpoints (safetensors + JSON), the last K kept
      metrics.jsonl    one line per logging step
      system.json      versions, device, wall time, peak memory (training's and the process's),
                       tokens/s, bytes of a 4-bit base
      eval.json        per-task metrics, when the recipe names eval tasks
"""

import dataclasses
import gc
import json
import logging
import platform
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import PartialState
from datasets import Dataset
from transformers import (DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase, Trainer,
                          TrainingArguments, set_seed)

from peftkit.api import apply_adapter, resolve_adapter, trainable_parameters
from peftkit.checkpoint import WEIGHTS_NAME, read_adapter_weights, save_adapter
from peftkit.data import DataStats, e2e_split, read_rows, resolve_source, tokenize_rows
from peftkit.data_tasks import tokenize_classes, tokenize_seq2seq
from peftkit.evaluation.splits import split_heldout
from peftkit.errors import ConfigError
from peftkit.models import load_model, task_of_model
from peftkit.nf4 import Linear4bit
from peftkit.methods import METHODS
from peftkit.methods.full import save_model, saved_dir, unfreeze
from peftkit.protocol import load_adapter_state_dict
from peftkit.recipe import Recipe, save_resolved
from peftkit.selection import dev_format, read_selection, selection_callback, split_dev
from peftkit.tune import DIVERGED
from peftkit.runlock import locked
from peftkit.distributed import (adopt_launcher, check_distributed, check_layout, per_process, train_dtype,
                                 without_layout)
from peftkit.sharding import gathered, resident_bytes, shard_model, trainable_state
from peftkit.trainer import (WRITE_ERRORS, PeftkitTrainer, TaskTrainer, TrainingDiverged, TrainingInterrupted,
                             checkpoints,
                             latest_resumable, load_trainable, peak_memory_mb, process_peak_memory_mb,
                             reset_peak_memory, write_failed)

logger = logging.getLogger(__name__)

HELDOUT, E2E_HELDOUT, SPLIT_SEED = 0.05, 0.2, 42  # as eval/alpaca-heldout.yaml and eval/e2e.yaml
GSM8K_EVAL_SIZE = 500  # eval/gsm8k.yaml's eval_size: its slice of the training file (split_seed 42)


def train(recipe: Recipe, *, source: str = "recipe", resume: bool = False, overwrite: bool = False) -> Path:
    """Run a recipe end to end and return its run directory.

    Raises:
        ConfigError: the output exists (without overwrite/resume), a data file is missing, or
            resuming a run whose recipe differs.
        TrainingDiverged: the loss became NaN or infinite.
    """
    out = Path(recipe.output)
    sources = data_sources(recipe)
    adapter_cfg = resolve_adapter(recipe.adapter, **recipe.adapter_overrides)
    adopt_launcher(recipe)
    check_distributed(recipe, adapter_cfg)
    state = PartialState(cpu=not torch.cuda.is_available())  # one process, or each of N data-parallel ones (joins their group)
    with locked(out, state.is_main_process):  # a second `peftkit train` on this output refuses at once
        try:
            return _train(recipe, state, sources, adapter_cfg, source=source, resume=resume, overwrite=overwrite)
        except TrainingDiverged as exc:  # a study's tuning reads this: the trial lost, it did not fail
            if state.is_main_process:
                (out / DIVERGED).write_text(json.dumps({"error": str(exc)}) + "\n")
            raise


def _train(recipe: Recipe, state: PartialState, sources: list, adapter_cfg: Any, *, source: str, resume: bool,
           overwrite: bool) -> Path:
    out = Path(recipe.output)
    last = claim_run(recipe, state, source=source, resume=resume, overwrite=overwrite)
    started = time.perf_counter()
    set_seed(recipe.train.seed)  # the adapter's random init too: same seed, same run
    sharded = recipe.train.distributed == "fsdp" and state.num_processes > 1
    # each GPU process on its own device; sharded, on the CPU: fully_shard moves each shard there
    device = "cpu" if sharded else state.device if state.device.type == "cuda" else None
    model, tokenizer = load_model(recipe.model, dtype=train_dtype(recipe.train.precision), task=recipe.task,
                                  num_labels=recipe.num_labels, device=device)
    task = task_of_model(model)
    train_set, stats, dev_rows = build_datasets(recipe, tokenizer, sources, task)
    model, save_fn, load_fn, allocator, regularization = attach_adapter(model, recipe, adapter_cfg, task, tokenizer)
    trainable = trainable_parameters(model)
    logger.info("trainable: %s / %s (%.2f%%)", f"{trainable[0]:,}", f"{trainable[1]:,}",
                100 * trainable[0] / trainable[1])
    run = RunInfo(started, stats, trainable, quantized_base_bytes(model), sharded, tokens_before(last))
    if sharded:
        shard_model(model)
    elif recipe.train.distributed == "fsdp":
        logger.info("train.distributed: fsdp in one process: nothing to shard, training the whole model")

    run_dir = {"run_dir": out, "save_adapter": save_fn, "load_adapter_weights": load_fn,
               "optimizer_factory": _optimizer_factory(recipe, adapter_cfg), "regularization": regularization,
               "allocator": allocator, "checkpoint_copy": adapter_cfg.method != "full"}
    trainer = make_trainer(recipe, task, model, tokenizer, train_set, adapter_cfg, run_dir, sharded)
    if state.is_main_process and (selector := selection_callback(recipe, dev_rows, tokenizer, out)) is not None:
        trainer.add_callback(selector)
    reset_peak_memory()  # system.json's peak is training's, not loading's
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    if trainer.stopper.received is not None:
        name = signal.Signals(trainer.stopper.received).name
        raise TrainingInterrupted(f"{name} at step {trainer.state.global_step} of {trainer.state.max_steps}: checkpoint "
                                  f"saved in {out / 'checkpoints'}; continue with: peftkit train {out / 'recipe.yaml'} "
                                  f"--resume", trainer.stopper.received)
    return finish_run(recipe, state, trainer, model, tokenizer, adapter_cfg, save_fn, result.training_loss, run)


def claim_run(recipe: Recipe, state: PartialState, *, source: str, resume: bool, overwrite: bool) -> Path | None:
    """The run directory claimed and its recipe saved (by the main process); on every process, the
    checkpoint to resume from (None for a fresh run)."""
    out = Path(recipe.output)
    last = None
    if state.is_main_process:
        last = prepare_output(out, recipe, resume=resume, overwrite=overwrite, processes=state.num_processes)
        save_resolved(recipe, out / "recipe.yaml", source)
        (out / DIVERGED).unlink(missing_ok=True)  # an earlier attempt's
    state.wait_for_everyone()
    if not state.is_main_process:
        last = latest_resumable(out / "checkpoints") if resume else None
    return last


def make_trainer(recipe: Recipe, task: str, model: torch.nn.Module, tokenizer, train_set: Dataset, adapter_cfg: Any,
                 run_dir: dict, sharded: bool) -> Trainer:
    """trl's SFT trainer for a causal LM; transformers' Trainer for a head or an encoder-decoder."""
    out = Path(recipe.output)
    # Note: LoRA-family runs train padding-free (a batch is one row, position ids restart per
    # example, so examples never attend to each other): no compute is spent on pad tokens.
    # Virtual-token methods need the padded layout: their cache would bridge packed examples.
    padding_free = METHODS[adapter_cfg.method].padding_free
    if task == "causal-lm":
        return PeftkitTrainer(model=model, args=sft_config(recipe, out, padding_free, sharded), train_dataset=train_set,
                              processing_class=tokenizer, labels_only=recipe.impl == "peftkit", **run_dir)
    # the model computes its own loss from the labels: a class id, or the target's tokens
    collator = DataCollatorWithPadding(tokenizer) if task == "seq-cls" else DataCollatorForSeq2Seq(tokenizer)
    args = TrainingArguments(**training_arguments(recipe, out, sharded), remove_unused_columns=False)
    return TaskTrainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                       processing_class=tokenizer, **run_dir)


def attach_adapter(model: torch.nn.Module, recipe: Recipe, adapter_cfg: Any, task: str,
                   tokenizer: PreTrainedTokenizerBase) -> tuple:
    """The adapter on the model, ours or peft's (`impl`), with how to save and reload it, and the
    method's allocator and loss term (or None): (model, save_fn, load_fn, allocator, regularization).
    Full fine-tuning attaches nothing: every parameter trains, and a plain model is saved."""
    if adapter_cfg.method == "full":
        return unfreeze(model), lambda m, d: save_model(m, tokenizer, d), None, None, None
    if recipe.impl == "peft":
        from peftkit.peft_backend import (apply_peft, load_peft_weights, peft_allocator, peft_regularization,
                                           save_peft)

        model = apply_peft(model, adapter_cfg)
        regularization = peft_regularization(model) if task == "causal-lm" else None  # trl drops it
        return model, save_peft, load_peft_weights, peft_allocator(model, adapter_cfg), regularization
    apply_adapter(model, adapter_cfg)
    method = METHODS[adapter_cfg.method]
    allocator = method.allocator(model) if hasattr(method, "allocator") else None
    save_fn = lambda m, d: save_adapter(m, d, overwrite=True)  # noqa: E731
    load_fn = lambda m, d: load_adapter_state_dict(m, read_adapter_weights(d), str(Path(d) / WEIGHTS_NAME))  # noqa: E731
    return model, save_fn, load_fn, allocator, getattr(method, "regularization", None)


@dataclasses.dataclass
class RunInfo:
    """What a run records beside its trainer's state."""

    started: float  # time.perf_counter() at the start
    stats: DataStats
    trainable: tuple[int, int]  # (trainable, total) parameters
    quantized_base_bytes: int | None  # the 4-bit base, whole (measured before any sharding)
    sharded: bool
    resumed_tokens: int = 0  # tokens trained before the checkpoint this process resumed from


def tokens_before(checkpoint: Path | None) -> int:
    """Training tokens a checkpoint had seen (0 for a fresh run): a resumed run's speed counts its own."""
    if checkpoint is None:
        return 0
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    return int(state.get("num_input_tokens_seen") or 0)


def finish_run(recipe: Recipe, state: PartialState, trainer: Trainer, model: torch.nn.Module, tokenizer,
               adapter_cfg: Any, save_fn: Callable, loss: float, run: RunInfo) -> Path:
    """After the last step: per-process memory, the adapter saved (gathered whole when sharded),
    eval, the card and system.json. Every process enters; the main one writes."""
    out = Path(recipe.output)
    quantized = [m for m in model.modules() if isinstance(m, Linear4bit)]
    memory = {"peak_memory_mb_per_process": per_process(state, round(peak_memory_mb(), 1)),
              "model_bytes_per_process": per_process(state, resident_bytes([model]))}
    if quantized:
        memory["quantized_base_bytes_per_process"] = per_process(state, resident_bytes(quantized))
    with gathered(model):  # the adapter whole for saving: the last collective of a sharded run
        if trainer.args.should_save:
            save_final(save_fn, model, out, saved_dir(out, adapter_cfg.method).name)
            tensors = trainable_state(model) if run.sharded and recipe.eval.tasks else None  # whole here already
    if not trainer.args.should_save:
        return out  # other data-parallel ranks: the main process writes the run directory
    metrics = {"train_loss": round(loss, 4)}
    if recipe.eval.tasks:
        if run.sharded:
            model = unsharded(recipe, adapter_cfg, trainer, tensors)
        metrics.update(run_eval(recipe, model, tokenizer, out))
    write_card(saved_dir(out, adapter_cfg.method), recipe, adapter_cfg, run.trainable, metrics)
    write_system(out, trainer, run, memory)
    return out


def save_final(save_fn: Callable, model: torch.nn.Module, out: Path, saved: str = "adapter") -> None:
    """The trained adapter into `out/adapter` (full fine-tuning: the model into `out/model`), written
    aside, then renamed into place.

    Raises:
        CheckpointFailed: it could not be written (disk full, a file-size limit): one line naming
            the checkpoint that `--resume` continues from (the last step's, which holds the adapter).
    """
    try:
        save_fn(model, out / saved)
    except WRITE_ERRORS as exc:
        raise write_failed(f"the {saved} to {out / saved}", out / "checkpoints", out, exc) from None


def unsharded(recipe: Recipe, adapter_cfg: Any, trainer: Trainer, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The trained model whole, for eval on the main process: the sharded one let go, the base
    loaded afresh (on its default device: one that holds the whole model) with the adapter applied
    as at the start and the trained tensors copied in."""
    trainer.accelerator.free_memory()
    trainer.model = trainer.model_wrapped = None
    gc.collect()
    model, _ = load_model(recipe.model, dtype=train_dtype(recipe.train.precision), task=recipe.task,
                          num_labels=recipe.num_labels)
    apply_adapter(model, adapter_cfg)
    load_trainable(model, tensors, Path(recipe.output))
    return model


def prepare_output(out: Path, recipe: Recipe, *, resume: bool, overwrite: bool, processes: int = 1) -> Path | None:
    """Guard the run directory; return the checkpoint to resume from, if any."""
    claim_output(out, recipe, resume=resume, overwrite=overwrite)
    if not resume:
        return None
    found = checkpoints(out / "checkpoints")
    if not found:
        raise ConfigError(f"--resume: {out}/checkpoints holds no checkpoint yet: rerun with --overwrite")
    last = latest_resumable(out / "checkpoints")
    if last is None:
        raise ConfigError(f"--resume: every checkpoint in {out}/checkpoints is damaged (see the warnings): rerun "
                          f"with --overwrite")
    check_layout(last, recipe, processes)
    logger.info("resuming from %s", last)
    return last


def claim_output(out: Path, recipe: Recipe, *, resume: bool, overwrite: bool, holds: str = "run") -> None:
    """Resuming: `out` must hold the same recipe (but for how the global batch is split: see
    `check_layout`). Otherwise `out` must be empty or absent, or `overwrite` given (then it is
    cleared); it exists afterwards."""
    saved = out / "recipe.yaml"
    if resume:
        if not saved.is_file():
            raise ConfigError(f"--resume: {out} holds no {holds} (no recipe.yaml): start it without --resume")
        if without_layout(yaml.safe_load(saved.read_text())) != without_layout(
                yaml.safe_load(yaml.safe_dump(recipe.to_dict()))):
            raise ConfigError(f"--resume: the recipe differs from {saved}: resume with the same recipe and overrides")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConfigError(f"output directory {out} already exists: pass --overwrite to replace it, --resume to "
                              f"continue it, or set output=another/dir")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def data_sources(recipe: Recipe) -> list[tuple[str, Path, str]]:
    """(name, file, format) of each training source, checked to exist."""
    found = []
    for source in recipe.data.sources:
        path, default_format = resolve_source(source)
        fmt = recipe.data.format or default_format
        if fmt is None:
            raise ConfigError(f"data.format: required for {source} (alpaca, chat, text, sst2, e2e, gsm8k or seq2seq)")
        if not path.is_file():
            raise ConfigError(f"data.train: {path} does not exist: fix the path or set PEFTKIT_DATA")
        found.append((source, path, fmt))
    return found


def build_datasets(recipe: Recipe, tokenizer, sources: list[tuple[str, Path, str]],
                   task: str = "causal-lm") -> tuple[Dataset, DataStats, list]:
    """Read, split (deterministically), limit and tokenise each source's training part for the
    model's task; mixed sources are concatenated (the trainer's seeded sampler shuffles them
    together). The held-out parts are left out here and scored by the eval tasks
    (`alpaca-heldout`, `e2e`), which split the same way. With a `selection` metric, its dev split
    is carved from the (limited) training rows of the sources its task scores, and returned.

    Raises:
        ConfigError: a format the task cannot read, labels the head cannot hold, or no usable example.
    """
    if task == "token-cls":
        raise ConfigError("task: token-cls has no training data format yet (it needs a label per token): train it "
                          "through the Python API (peftkit.apply_adapter + your own Trainer)")
    if task != "causal-lm" and recipe.data.packing:
        raise ConfigError(f"data.packing: task {task} trains one example per row: set data.packing: false")
    columns: dict[str, list] = {"input_ids": [], "labels": []}
    stats, dev_rows, select = DataStats(), [], recipe.selection
    for name, path, fmt in sources:
        train_rows, held_rows = split_rows(read_rows(path), fmt, recipe.data.eval_fraction)
        if recipe.data.limit:
            train_rows = train_rows[: recipe.data.limit]
        if select.metric and fmt == dev_format(select.metric):
            train_rows, dev = split_dev(train_rows, fmt, select.dev_fraction, select.seed)
            dev_rows += dev
            logger.info("data %s: %d rows held out as the dev split for %s", name, len(dev), select.metric)
        max_length = recipe.data.max_length
        if task == "seq-cls":
            part, part_stats = tokenize_classes(tokenizer, train_rows, fmt, max_length, recipe.num_labels, name)
        elif task == "seq2seq":
            part, part_stats = tokenize_seq2seq(tokenizer, train_rows, fmt, max_length)
        else:
            part, part_stats = tokenize_rows(tokenizer, train_rows, fmt, max_length)
        if not part["input_ids"]:
            raise ConfigError(f"data.train: no usable example in {path} at max_length {recipe.data.max_length}: "
                              f"raise data.max_length")
        for key in columns:
            columns[key] += part[key]
        for key, value in dataclasses.asdict(part_stats).items():
            setattr(stats, key, getattr(stats, key) + value)
        logger.info("data %s: %d training examples (%d truncated, %d dropped), %d held out", name,
                    part_stats.examples, part_stats.truncated, part_stats.dropped, len(held_rows))
    if select.metric and not dev_rows:
        raise ConfigError(f"selection.dev_fraction: {select.dev_fraction} of the training rows is no row at all: "
                          f"raise it or data.limit")
    return Dataset.from_dict(columns), stats, dev_rows


def split_rows(rows: list, fmt: str, fraction: float | None) -> tuple[list, list]:
    """(training rows, held-out rows): the same splits (fractions and seeds) as the eval tasks'
    held-out parts, so no run trains on what `peftkit eval` scores it on; the seeds are fixed,
    independent of train.seed."""
    if fmt == "e2e":
        return e2e_split(rows, fraction or E2E_HELDOUT, seed=0)
    if fmt == "gsm8k" and fraction is None:  # the gsm8k task scores a fixed-size slice of the same file
        from peftkit.evaluation.tasks.gsm8k import eval_slice

        held_idx, train_idx = eval_slice(len(rows), min(GSM8K_EVAL_SIZE, len(rows) - 1), SPLIT_SEED)
        return [rows[i] for i in train_idx], [rows[i] for i in sorted(held_idx)]
    train_idx, held_idx = split_heldout(len(rows), fraction or HELDOUT, seed=SPLIT_SEED)
    return [rows[i] for i in train_idx], [rows[i] for i in held_idx]


def training_arguments(recipe: Recipe, out: Path, sharded: bool = False) -> dict[str, Any]:
    """transformers' TrainingArguments of a recipe, shared by every task. `sharded`: the Trainer
    refuses to checkpoint a sharded model's optimizer itself; RunDirectory writes it instead, so
    its own saving is reduced to the model (which RunDirectory replaces too)."""
    t = recipe.train
    dtype = train_dtype(t.precision)
    return dict(
        output_dir=str(out / "checkpoints"), num_train_epochs=t.epochs, max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr, lr_scheduler_type="constant_with_warmup" if t.scheduler == "constant" else t.scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16, use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=t.gradient_checkpointing, activation_checkpointing_kwargs={"use_reentrant": False},
        seed=t.seed, data_seed=t.seed, logging_steps=t.logging_steps, logging_first_step=True,
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        report_to="none", include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
        disable_tqdm=False, optim="adamw_torch", save_only_model=sharded)


def _optimizer_factory(recipe: Recipe, adapter_cfg):
    """LoRA+'s optimizer when the recipe asks for it (ours, or peft's for impl=peft); else the Trainer's."""
    ratio = recipe.train.loraplus_lr_ratio
    if ratio is None:
        return None
    if adapter_cfg.method != "lora":
        raise ConfigError(f"train.loraplus_lr_ratio applies to LoRA adapters (lora, dora, qlora), not "
                          f"{adapter_cfg.method}: remove it or use a LoRA preset")
    from peftkit.loraplus import loraplus_optimizer

    return loraplus_optimizer(ratio, recipe.impl)


def sft_config(recipe: Recipe, out: Path, padding_free: bool = False, sharded: bool = False):
    """trl's SFTConfig: the shared arguments, and how rows are padded or packed."""
    from trl import SFTConfig

    d = recipe.data
    return SFTConfig(
        **training_arguments(recipe, out, sharded), packing=d.packing, packing_strategy="bfd",
        padding_free=padding_free or d.packing,
        # examples are already cut to data.max_length (keeping the end-of-turn); packing needs the row length
        max_length=d.max_length if d.packing or not padding_free else None)


def run_eval(recipe: Recipe, model, tokenizer, out: Path) -> dict[str, Any]:
    """Evaluate the trained model on the recipe's tasks; writes eval.json, returns headline metrics."""
    from peftkit.evaluation import evaluate_model, write_report

    model.eval()
    results = evaluate_model(model, tokenizer, recipe.eval.tasks, shots=recipe.eval.shots, limit=recipe.eval.limit)
    write_report(results, out / "eval.json")
    headline = {}
    for task, values in results.get("tasks", results).items():
        for name, value in (values.get("metrics", values) if isinstance(values, dict) else {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                headline[f"{task}/{name}"] = round(value, 4)
    return headline


def write_card(directory: Path, recipe: Recipe, cfg: Any, trainable: tuple[int, int], metrics: dict) -> None:
    from peftkit.card import render_card

    notes = [f"Trained with peftkit (impl: {recipe.impl}) on {' + '.join(recipe.data.sources)}, format "
             f"{recipe.data.format or 'default'}, max_length {recipe.data.max_length}; recipe in ../recipe.yaml."]
    hyper = {**dataclasses.asdict(cfg), "lr": recipe.train.lr, "epochs": recipe.train.epochs,
             "max_steps": recipe.train.max_steps, "batch_size": recipe.train.batch_size * recipe.train.grad_accum}
    (directory / "README.md").write_text(render_card(base_model=recipe.model, method=cfg.method, hyperparameters=hyper,
                                                     trainable=trainable, data=recipe.data.sources,
                                                     metrics=metrics, notes=notes))


def write_system(out: Path, trainer: Trainer, run: RunInfo, memory: dict[str, list]) -> None:
    import peftkit
    import transformers
    import trl

    wall = time.perf_counter() - run.started
    tokens = trainer.state.num_input_tokens_seen
    train_seconds = next((h["train_runtime"] for h in reversed(trainer.state.log_history) if "train_runtime" in h), wall)
    selection = read_selection(out)
    if selection:  # scoring the dev split is not training: its time (in this process) is left out of the speed
        train_seconds -= selection.get("process_seconds", 0.0)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    trainable, total = run.trainable
    record = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "trl": trl.__version__, "peftkit": peftkit.__version__},
        "device": device, "platform": platform.platform(), "world_size": trainer.args.world_size,
        "wall_time_s": round(wall, 2), "train_time_s": round(train_seconds, 2),
        "selection_time_s": round(selection["seconds"], 2) if selection else None,
        "distributed": ("fsdp" if run.sharded else "ddp") if trainer.args.world_size > 1 else None,
        "peak_memory_mb": memory["peak_memory_mb_per_process"][0], **memory,
        "process_peak_memory_mb": round(process_peak_memory_mb(), 1),
        "quantized_base_bytes": run.quantized_base_bytes, "train_tokens": tokens,
        "tokens_per_s": round((tokens - run.resumed_tokens) / max(train_seconds, 1e-9), 1),
        "steps": trainer.state.global_step,
        "trainable_parameters": trainable, "total_parameters": total, "data": dataclasses.asdict(run.stats),
    }
    (out / "system.json").write_text(json.dumps(record, indent=2) + "\n")


def quantized_base_bytes(model: torch.nn.Module) -> int | None:
    """Bytes of the 4-bit base layers with their quantisation state (ours or bitsandbytes'); None
    for a model without any."""
    from peftkit.qlora import weight_memory

    ours = weight_memory(model)
    if ours["layers"]:
        return int(ours["bytes"])
    weights = {}  # bitsandbytes: each Params4bit once (peft's LoRA wrapper exposes its base's `weight` too)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is not None:
            weights[id(weight)] = weight
    total = 0
    for weight in weights.values():  # the packed codes plus the QuantState's tensors
        state = weight.quant_state
        tensors = [weight, state.absmax, state.code]
        if state.nested:
            tensors += [state.offset, state.state2.absmax, state.state2.code]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total or None

