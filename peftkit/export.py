"""`peftkit export --format gguf`: a model, or an adapter merged into its base, as one GGUF file
(llama.cpp's format), written with the `gguf` package and checked by reloading it.

The file follows llama.cpp's `convert_hf_to_gguf.py` for Llama, Qwen2 and Gemma 3 (text) models:
its tensor names, norms and biases kept in F32, tied embeddings written once, and the tokenizer as
GGUF metadata (`peftkit.gguf_tokenizer`). What differs per family (architecture name, tensor map,
metadata keys, the rotary permutation of Llama's q/k, Gemma's norm offsets, what llama.cpp cannot
describe) sits in the family's file under `peftkit.models`. Every export reloads the file with
transformers' GGUF loader and measures it against the model it came from on fixed prompts: whether
the tokenizer round-trips, the max logit difference, teacher-forced top-1 agreement and greedy
generations. Before that, every metadata key, tensor name, `tokenizer.ggml.model` and
`tokenizer.ggml.pre` is checked against the names llama.cpp's source accepts
(`peftkit.llamacpp_names`); with `llamacpp=True`, llama.cpp itself loads the file and is measured
the same way (`peftkit.gguf_llamacpp`). The record lands beside the file (`<file>.json`) and names
the readers that checked it (`checked_by`).
"""

import json
import logging
import os
import shutil
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import transformers
from torch import nn

from peftkit import llamacpp_names
from peftkit.atomic import signals_held, temp_path
from peftkit.errors import ConfigError, ModelError
from peftkit.gguf_tokenizer import Writer, add_tokenizer
from peftkit.models import load_model
from peftkit.models.registry import FAMILIES as MODEL_FAMILIES

logger = logging.getLogger(__name__)

OUTTYPES = ("f16", "q8_0", "f32")
PROBES = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip, numbered 1 to 3.",
]
GREEDY_TOKENS = 16
INSTEAD = "merge with `peftkit merge` and convert that directory with llama.cpp's convert_hf_to_gguf.py instead"
# transformers model_type -> family file, for the families that describe llama.cpp's layout
FAMILIES = {model_type: family for model_type, family in MODEL_FAMILIES.items() if hasattr(family, "GGUF_ARCH")}
TOP_TENSORS = {  # transformers names outside the layers -> llama.cpp names, the same in every family
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def export(source: str | Path, *, fmt: str = "gguf", outtype: str = "f16", out: str | Path | None = None,
           base: str = "4bit", overwrite: bool = False, llamacpp: bool = False) -> dict:
    """Write `source` as a GGUF file and return the reload check, also saved as `<file>.json`.

    Args:
        source: a run directory, an adapter directory (merged into its base first), a model
            directory (e.g. from `peftkit merge`) or a registry name.
        fmt: the file format; `gguf`.
        outtype: `f16` (norms stay F32), `q8_0` (llama.cpp's 8-bit blocks of 32) or `f32`.
        out: the file to write; None: `<name>-<outtype>.gguf` in the run or model directory.
        base: QLoRA adapters only: merge into the dequantised 4-bit base (default) or the original.
        overwrite: replace an existing file.
        llamacpp: also load the file in llama.cpp and compare (needs the `llama_cpp` module).

    Raises:
        ConfigError: a bad option, `out` exists without `overwrite`, or `llamacpp` without the
            `llama_cpp` module.
        ModelError: not a Llama, Qwen2 or Gemma 3 text model, one llama.cpp's layout cannot
            describe, a tokenizer GGUF (or llama.cpp) cannot describe, or a file llama.cpp
            would refuse.
        AdapterError: a prefix or prompt adapter (cannot merge).
    """
    if fmt != "gguf":
        raise ConfigError(f"--format must be gguf, got {fmt!r}")
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    out = Path(out) if out is not None else default_path(source, outtype)
    sidecar = out.with_name(out.name + ".json")
    if out.suffix != ".gguf":
        raise ConfigError(f"--out {out}: a GGUF file name ends in .gguf")
    if (out.exists() or sidecar.exists()) and not overwrite:
        raise ConfigError(f"{out} already exists: pass --overwrite to replace it, or choose another --out")
    if llamacpp:
        from peftkit.gguf_llamacpp import load_binding

        load_binding()  # before any work: no module is a one-line error now, not after the export
    model, tokenizer, label = load_source(source, base)
    family = family_of(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = temp_path(out)  # the file and its record are written here, then renamed into place
    try:
        work.mkdir()
        path = work / out.name
        started = time.perf_counter()
        write_gguf(model, tokenizer, path, outtype, label, family)
        if problems := llamacpp_names.file_problems(path):
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise ModelError(f"GGUF export wrote a file {llamacpp_names.source()} would not read as meant "
                             f"({'; '.join(problems[:3])}{more}): report it, and {INSTEAD}")
        record = {"source": str(source), "model": label, "format": "gguf", "outtype": outtype,
                  "bytes": path.stat().st_size, **verify(model, tokenizer, path)}
        record["checked_by"] = [f"transformers {transformers.__version__} GGUF loader (reload, logits, generations)",
                                f"{llamacpp_names.source()} names (metadata keys, tensor names, tokenizer)"]
        if llamacpp:
            from peftkit.gguf_llamacpp import check

            record["llamacpp"] = check(model, tokenizer, path)
            if not record["llamacpp"]["loads"]:
                raise ModelError(f"llama.cpp refuses the exported file ({record['llamacpp']['error']}): nothing was "
                                 f"written; report it, and {INSTEAD}")
            record["checked_by"].append(f"{record['llamacpp']['reader']} (load, token ids, logits, generations)")
        record["seconds"] = round(time.perf_counter() - started, 1)  # writing and checking
        record["warning"] = _warning(record)
        (work / sidecar.name).write_text(json.dumps(record, indent=2) + "\n")
        with signals_held():  # the file and its record: both or neither
            os.replace(path, out)
            os.replace(work / sidecar.name, sidecar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if record["warning"]:
        logger.warning("export check: %s", record["warning"])
    return {**record, "path": str(out)}


def default_path(source: str | Path, outtype: str) -> Path:
    """`<dir>/<dir name>-<outtype>.gguf` for a run or model directory; an adapter directory's
    file goes beside it (into its run); a registry name's into the working directory."""
    path = Path(source)
    if not path.is_dir():
        return Path(f"{Path(str(source)).name}-{outtype}.gguf")
    path = path.resolve()
    if (path / "adapter_config.json").is_file():
        path = path.parent
    return path / f"{path.name}-{outtype}.gguf"


def load_source(source: str | Path, base: str) -> tuple[nn.Module, object, str]:
    """(plain fp32 model, tokenizer, a name for the file's metadata)."""
    from peftkit.merge import load_adapted, merge_loaded

    path = Path(source)
    has_adapter = (path / "adapter_config.json").is_file() or (path / "adapter" / "adapter_config.json").is_file()
    if has_adapter:
        adapted, tokenizer, base_name, adapter_dir = load_adapted(path)
        logger.info("merging %s into %s", adapter_dir, base_name)
        model = merge_loaded(adapted, base_name, adapter_dir, base)
        return model.eval(), tokenizer, f"{Path(base_name).name} + {path.resolve().name}"
    model, tokenizer = load_model(str(source), dtype="fp32", device="cpu")
    return model.eval(), tokenizer, path.resolve().name if path.is_dir() else str(source)


def family_of(model: nn.Module) -> ModuleType:
    """The family file that describes `model` in llama.cpp's layout (see `FAMILIES`), its checks passed."""
    model_type = model.config.model_type
    if model_type not in FAMILIES:
        raise ModelError(f"GGUF export supports model_type {', '.join(FAMILIES)}, not {model_type!r}: {INSTEAD}")
    family = FAMILIES[model_type]
    family.gguf_check(model.config, INSTEAD)
    return family


# --- writing ---------------------------------------------------------------------------------


def write_gguf(model: nn.Module, tokenizer, path: Path, outtype: str, name: str, family: ModuleType) -> None:
    """The keys every family shares, then the family's own, the tokenizer and the tensors."""
    import gguf

    config = model.config
    vocab = model.get_input_embeddings().weight.shape[0]
    writer = Writer(str(path), family.GGUF_ARCH)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    family.gguf_metadata(writer, config)
    writer.add_vocab_size(vocab)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, vocab, family.GGUF_TOKENIZERS, INSTEAD)
    for gguf_name, tensor in gguf_tensors(model, family):
        data, raw_dtype = encode(tensor, outtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def gguf_tensors(model: nn.Module, family: ModuleType):
    """(llama.cpp name, tensor) for every weight and bias, after the family's quirks (rotary
    permutation, norm offsets); a tied head is written once, as the embedding."""
    config = model.config
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue
        gguf_name = gguf_name_of(key, family)
        yield gguf_name, family.gguf_tensor(gguf_name, tensor, config)


def gguf_name_of(key: str, family: ModuleType) -> str:
    """llama.cpp's name for the transformers state-dict key `key`."""
    if key in TOP_TENSORS:
        return TOP_TENSORS[key]
    index, _, rest = key.removeprefix("model.layers.").partition(".")
    module, _, kind = rest.rpartition(".")
    if not key.startswith("model.layers.") or module not in family.GGUF_LAYER_TENSORS or kind not in ("weight", "bias"):
        raise ModelError(f"GGUF export: no llama.cpp name for tensor {key}: {INSTEAD}")
    return f"blk.{index}.{family.GGUF_LAYER_TENSORS[module]}.{kind}"


def encode(tensor: torch.Tensor, outtype: str):
    """(array, raw GGML type or None): 1-D tensors (norms, biases) stay F32, as llama.cpp keeps them."""
    import gguf

    array = tensor.detach().float().cpu().numpy()
    if array.ndim == 1 or outtype == "f32":
        return array, None
    if outtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


# --- checking --------------------------------------------------------------------------------


@torch.no_grad()
def verify(model: nn.Module, tokenizer, path: Path) -> dict:
    """Reload `path` with transformers' GGUF loader and compare it with `model` on PROBES: in the
    chat template when the tokenizer has one, else as plain text with the tokenizer's special tokens
    (a base model's `<bos>`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("reloading %s with transformers' GGUF loader to check it", path.name)
    reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    chat = isinstance(tokenizer.chat_template, str)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROBES] if chat else list(PROBES)
    split = {"add_special_tokens": not chat}  # a chat template writes its own special tokens
    same_tokens = sum(tokenizer(t, **split)["input_ids"] == reloaded_tokenizer(t, **split)["input_ids"] for t in texts)
    max_diff, agree, positions, greedy_equal = 0.0, 0, 0, 0
    stop = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    for text in texts:
        ids = torch.tensor([tokenizer(text, **split)["input_ids"]])
        ours, theirs = model(input_ids=ids).logits[0], reloaded(input_ids=ids).logits[0]
        max_diff = max(max_diff, (ours - theirs).abs().max().item())
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        positions += ids.shape[1]
        mask = torch.ones_like(ids)
        a = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GREEDY_TOKENS, do_sample=False, **stop)
        b = reloaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GREEDY_TOKENS, do_sample=False, **stop)
        greedy_equal += torch.equal(a, b)
    return {"prompts": len(texts), "prompt_format": "chat template" if chat else "plain text",
            "tokenizer_round_trip": f"{same_tokens}/{len(texts)}", "max_logit_diff": max_diff,
            "top1_agreement": agree / positions, "greedy_generations_equal": f"{greedy_equal}/{len(texts)}",
            "greedy_tokens": GREEDY_TOKENS}


def _warning(record: dict) -> str | None:
    problems = []
    if record["tokenizer_round_trip"] != f"{record['prompts']}/{record['prompts']}":
        problems.append(f"the reloaded tokenizer splits {record['tokenizer_round_trip']} probe prompts the same")
    if record["greedy_generations_equal"] != f"{record['prompts']}/{record['prompts']}":
        problems.append(f"greedy generations equal on {record['greedy_generations_equal']} probes")
    if record["top1_agreement"] < 1:
        problems.append(f"top-1 tokens agree on {100 * record['top1_agreement']:.1f}% of positions")
    if llama := record.get("llamacpp"):
        every = f"{llama['prompts']}/{llama['prompts']}"
        problems += [f"llama.cpp: {what} {llama[key]}" for key, what in
                     (("token_ids_equal", "token ids equal transformers' on"),
                      ("greedy_equal", "greedy continuations equal on")) if llama[key] != every]
        # a differing token is benign only where the model's best two were within the rounding
        wide = max(llama["top1_flip_margin"], llama["greedy_split_margin"])
        if wide > llama["max_logit_diff"]:
            problems.append(f"llama.cpp picks another token where the model's best two are {wide:.3f} apart, more "
                            f"than the file's largest logit difference ({llama['max_logit_diff']:.3f})")
    return "; ".join(problems) or None
