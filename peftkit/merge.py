"""`peftkit merge`: fold a trained adapter into its base and write a plain transformers model
that loads without peftkit, with the merge's own fidelity check in the model card.

Fidelity is measured, not assumed: the max logit difference between the merged model and the
adapter model on fixed prompts, and the held-out perplexity of both. A QLoRA adapter merges
into the dequantised 4-bit base it was trained against (`base="4bit"`, the default: the merged
model then computes what the trained model computed); `base="original"` merges into the
full-precision weights instead, which is what most tools do and what opens QLoRA's known
merge gap (the update was learned against the rounded weights).
"""

import json
import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
import yaml
from torch import nn

from peftkit.api import merge_adapter
from peftkit.atomic import staged
from peftkit.checkpoint import load_adapter, read_adapter_config, read_adapter_weights
from peftkit.data import data_root, read_rows, tokenize_rows
from peftkit.evaluation.splits import split_heldout
from peftkit.errors import AdapterError, ConfigError
from peftkit.models import DTYPES, REGISTRY, load_model, task_of_model
from peftkit.models.tasks import AUTO_CLASSES, HEAD_NAMES, PEFT_TASK_TYPES
from peftkit.methods import METHODS, method_label
from peftkit.protocol import PEFT_PREFIX

logger = logging.getLogger(__name__)

LOGIT_WARN = 1e-3  # fp32 merges land near 1e-5; past this something lost precision
PPL_WARN = 0.01  # relative perplexity change


def resolve_source(source: str | Path) -> tuple[Path, str]:
    """(adapter directory, base model name) for a run directory or an adapter directory."""
    source = Path(source)
    if (source / "model" / "config.json").is_file() and not (source / "adapter").exists():
        raise ConfigError(f"{source} is a full fine-tuning run: {source / 'model'} is already a plain transformers "
                          f"model, with nothing to merge (export or load it directly)")
    if (source / "adapter" / "adapter_config.json").is_file():
        recipe = yaml.safe_load((source / "recipe.yaml").read_text()) if (source / "recipe.yaml").is_file() else {}
        adapter = source / "adapter"
        base = recipe.get("model") or read_adapter_config(adapter).get("base_model_name_or_path")
        return adapter, base
    config = read_adapter_config(source)
    base = config.get("base_model_name_or_path")
    by_hub_id = {entry.hub_id: name for name, entry in REGISTRY.items()}
    return source, by_hub_id.get(base, base)


def heldout_batches(tokenizer, limit: int = 32, max_length: int = 256,
                    task: str = "causal-lm") -> list[dict[str, torch.Tensor]]:
    """Held-out Alpaca examples (the slice training never sees), one per batch: chat-formatted with
    completion labels for perplexity on a causal LM; for a classifier or an encoder-decoder, the
    instruction's plain text (labels unused: their logits are compared)."""
    from peftkit.data import Row, alpaca_pair
    from peftkit.data_tasks import source_text

    path = data_root() / "alpaca" / "alpaca_5000.json"
    if path.is_file():
        rows = read_rows(path)
        _, held = split_heldout(len(rows), 0.05, seed=42)
        rows = [rows[i] for i in held[:limit]]
    else:
        logger.warning("no Alpaca data at %s: fidelity is measured on built-in prompts", path)
        rows = [Row({"instruction": q, "output": a}, "built-in") for q, a in (
            ("Name the capital of France.", "The capital of France is Paris."),
            ("Give a synonym of happy.", "Joyful."), ("What is 2 + 3?", "2 + 3 = 5."))]
    if task != "causal-lm":
        texts = [source_text(alpaca_pair(row)[0]) for row in rows]
        return [{"input_ids": torch.tensor([tokenizer(text, truncation=True, max_length=max_length)["input_ids"]])}
                for text in texts]
    columns, _ = tokenize_rows(tokenizer, rows, "alpaca", max_length)
    return [{"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}
            for ids, labels in zip(columns["input_ids"], columns["labels"])]


@torch.no_grad()
def measure(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> tuple[list[torch.Tensor], float]:
    """(logits of each batch, perplexity over the trained tokens)."""
    model.eval()
    device = next(model.parameters()).device
    logits, nll, count = [], 0.0, 0
    task = task_of_model(model)
    for batch in batches:
        inputs = batch["input_ids"].to(device)
        if task != "causal-lm":  # a classifier or encoder-decoder: its outputs on the same inputs, no perplexity
            extra = {"decoder_input_ids": inputs} if task == "seq2seq" else {}
            logits.append(model(input_ids=inputs, **extra).logits.float().cpu())
            continue
        out = model(input_ids=inputs, labels=batch["labels"].to(device))
        logits.append(out.logits.float().cpu())
        n = int((batch["labels"][:, 1:] != -100).sum())
        nll, count = nll + out.loss.item() * n, count + n
    return logits, math.exp(nll / count) if count else float("nan")


def merge_to_dir(source: str | Path, out: str | Path, *, dtype: str = "fp32", base: str = "4bit",
                 overwrite: bool = False) -> dict:
    """Merge and save; returns the fidelity record also written into the model card.

    Raises:
        AdapterError: a prefix or prompt adapter (cannot merge), or an unreadable adapter.
        ConfigError: `out` exists without `overwrite`, or an unknown dtype or base.
    """
    out = Path(out)
    if dtype not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"--dtype must be fp32, bf16 or fp16, got {dtype!r}")
    if base not in ("4bit", "original"):
        raise ConfigError(f"--base must be 4bit or original, got {base!r}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    adapted, tokenizer, base_name, adapter_dir = load_adapted(source)
    cfg = adapted.peftkit_config
    batches = heldout_batches(tokenizer, task=task_of_model(adapted))
    before, ppl_before = measure(adapted, batches)
    merged = merge_loaded(adapted, base_name, adapter_dir, base)
    after, ppl_after = measure(merged, batches)
    merged = merged.to(DTYPES[dtype])
    record = {
        "adapter": str(adapter_dir), "base_model": base_name, "task": task_of_model(merged), "method": method_label(cfg),
        "merged_into": base if getattr(cfg, "quantize", None) else "original",
        "dtype": dtype, "max_logit_diff_fp32": max((a - b).abs().max().item() for a, b in zip(before, after)),
        "perplexity_adapter": ppl_before, "perplexity_merged": ppl_after, "heldout_examples": len(batches),
    }
    if dtype != "fp32":
        cast, _ = measure(merged, batches)
        record[f"max_logit_diff_{dtype}"] = max((a - b).abs().max().item() for a, b in zip(before, cast))
    record["warning"] = _fidelity_warning(record)
    if record["warning"]:
        logger.warning("merge fidelity: %s", record["warning"])
    with staged(out) as tmp:  # all or nothing under `out`, even when interrupted
        write_merged(merged, tokenizer, tmp, record)
    return record


def load_adapted(source: str | Path) -> tuple[nn.Module, object, str, Path]:
    """(base model with the adapter applied, tokenizer, base model name, adapter directory) in fp32
    on the CPU, for a run or adapter directory whose adapter can be merged.

    Raises:
        AdapterError: a prefix or prompt adapter (cannot merge), or an unreadable adapter.
    """
    adapter_dir, base_name = resolve_source(source)
    model, tokenizer = load_model(base_name, dtype="fp32", device="cpu", **saved_task(adapter_dir))
    adapted = load_adapter(model, adapter_dir)
    cfg = adapted.peftkit_config
    if not METHODS[cfg.method].mergeable:
        raise AdapterError(f"{cfg.method} adapters cannot be merged into the weights: ship the adapter directory "
                           f"{adapter_dir} and load it with peftkit or peft")
    return adapted, tokenizer, base_name, adapter_dir


def saved_task(adapter_dir: Path) -> dict:
    """`task` (and `num_labels`, from the saved head's rows) of the model an adapter was trained on."""
    by_peft = {peft: task for task, peft in PEFT_TASK_TYPES.items()}
    task = by_peft.get(read_adapter_config(adapter_dir).get("task_type") or "CAUSAL_LM", "causal-lm")
    if task not in ("seq-cls", "token-cls"):
        return {"task": task}
    head_keys = {f"{PEFT_PREFIX}{name}.weight" for name in HEAD_NAMES}
    heads = [t for key, t in read_adapter_weights(adapter_dir).items() if key in head_keys]
    return {"task": task, "num_labels": heads[0].shape[0]} if heads else {"task": task}


def merge_loaded(adapted: nn.Module, base_name: str, adapter_dir: Path, base: str = "4bit") -> nn.Module:
    """Fold the adapter in and return a plain transformers model. A QLoRA adapter goes into the
    dequantised 4-bit base it was trained on (`base="4bit"`) or into the original weights."""
    cfg = adapted.peftkit_config
    if getattr(cfg, "quantize", None) and base == "original":
        adapted = _reload_on_original_base(base_name, adapter_dir, cfg)
    return merge_adapter(adapted, unload=True)


def _reload_on_original_base(base_name: str, adapter_dir: Path, cfg) -> nn.Module:
    """The QLoRA adapter applied as plain LoRA to the unquantised base (to measure the merge gap)."""
    from peftkit.api import apply_adapter
    from peftkit.protocol import load_adapter_state_dict

    model, _ = load_model(base_name, dtype="fp32", device="cpu", **saved_task(adapter_dir))
    apply_adapter(model, replace(cfg, quantize=None))
    load_adapter_state_dict(model, read_adapter_weights(adapter_dir), str(adapter_dir))
    return model


def _fidelity_warning(record: dict) -> str | None:
    ppl_change = abs(record["perplexity_merged"] / record["perplexity_adapter"] - 1)
    if record["max_logit_diff_fp32"] > LOGIT_WARN or ppl_change > PPL_WARN:
        return (f"the merged model differs from the adapter model (max logit diff "
                f"{record['max_logit_diff_fp32']:.2e}, perplexity {record['perplexity_adapter']:.3f} -> "
                f"{record['perplexity_merged']:.3f}): serve the adapter unmerged if this matters")
    return None


def write_merged(model: nn.Module, tokenizer, directory: Path, record: dict) -> None:
    """A plain transformers model, its tokenizer, merge.json and a card with the record, into `directory`."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    (directory / "merge.json").write_text(json.dumps(record, indent=2) + "\n")
    (directory / "README.md").write_text(_card(record))


def _card(record: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in record.items() if v is not None)
    return (f"---\nbase_model: {record['base_model']}\nlibrary_name: transformers\ntags:\n- peftkit\n- merged\n---\n\n"
            f"# {record['method']} adapter merged into {record['base_model']}\n\nA plain transformers model: "
            f"`{AUTO_CLASSES[record['task']].__name__}.from_pretrained(this_dir)`, no peftkit needed. Merged by `peftkit merge` from "
            f"`{record['adapter']}`.\n\n## Merge fidelity\n\nMeasured on {record['heldout_examples']} held-out "
            f"examples: logits of the merged model vs the adapter model, and perplexity of both.\n\n"
            f"| check | value |\n| --- | --- |\n{rows}\n")
