"""`peftkit export --format gguf`: a model, or an adapter merged into its base, as one GGUF file
(llama.cpp's format), written with the `gguf` package and checked by reloading it.

The file follows llama.cpp's `convert_hf_to_gguf.py` for Llama models: its tensor names, the
rotary permutation of the query and key weights, norms kept in F32, tied embeddings written
once, and the tokenizer as GGUF metadata (byte-level BPE vocabulary, merges, token types,
special token ids, chat template). Every export reloads the file with transformers' GGUF loader
and measures it against the model it came from on fixed prompts: whether the tokenizer
round-trips, the max logit difference, teacher-forced top-1 agreement and greedy generations.
The record lands beside the file (`<file>.json`).
"""

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from torch import nn

from peftkit.errors import ConfigError, ModelError
from peftkit.models import load_model

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
LAYER_TENSORS = {  # transformers name inside model.layers.N -> llama.cpp name inside blk.N
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def export(source: str | Path, *, fmt: str = "gguf", outtype: str = "f16", out: str | Path | None = None,
           base: str = "4bit", overwrite: bool = False) -> dict:
    """Write `source` as a GGUF file and return the reload check, also saved as `<file>.json`.

    Args:
        source: a run directory, an adapter directory (merged into its base first), a model
            directory (e.g. from `peftkit merge`) or a registry name.
        fmt: the file format; `gguf`.
        outtype: `f16` (norms stay F32), `q8_0` (llama.cpp's 8-bit blocks of 32) or `f32`.
        out: the file to write; None: `<name>-<outtype>.gguf` in the run or model directory.
        base: QLoRA adapters only: merge into the dequantised 4-bit base (default) or the original.
        overwrite: replace an existing file.

    Raises:
        ConfigError: a bad option, or `out` exists without `overwrite`.
        ModelError: not a Llama-architecture model, or a tokenizer GGUF cannot describe.
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
    model, tokenizer, label = load_source(source, base)
    check_architecture(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"  # same file system: the final move is a rename
    try:
        work.mkdir()
        path = work / out.name
        write_gguf(model, tokenizer, path, outtype, label)
        record = {"source": str(source), "model": label, "format": "gguf", "outtype": outtype,
                  "bytes": path.stat().st_size, **verify(model, tokenizer, path)}
        record["warning"] = _warning(record)
        (work / sidecar.name).write_text(json.dumps(record, indent=2) + "\n")
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


def check_architecture(model: nn.Module) -> None:
    config = model.config
    if config.model_type != "llama":
        raise ModelError(f"GGUF export supports Llama-architecture models (model_type llama), not "
                         f"{config.model_type!r}: {INSTEAD}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelError(f"GGUF export of Llama models with attention or MLP biases is not supported: {INSTEAD}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export supports plain RoPE, not rope_type {rope['rope_type']!r}: {INSTEAD}")


# --- writing ---------------------------------------------------------------------------------


def write_gguf(model: nn.Module, tokenizer, path: Path, outtype: str, name: str) -> None:
    import gguf

    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    vocab = model.get_input_embeddings().weight.shape[0]
    rope = getattr(config, "rope_parameters", None) or {}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(vocab)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]
    writer.add_file_type(file_type)
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, tokenizer, vocab)
    for gguf_name, tensor in gguf_tensors(model):
        data, raw_dtype = encode(tensor, outtype)
        writer.add_tensor(gguf_name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()


def gguf_tensors(model: nn.Module):
    """(llama.cpp name, tensor) for every weight, query and key rows permuted as llama.cpp does."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in state.items():
        if key == "model.embed_tokens.weight":
            yield "token_embd.weight", tensor
        elif key == "model.norm.weight":
            yield "output_norm.weight", tensor
        elif key == "lm_head.weight":
            if not tied:
                yield "output.weight", tensor
        else:
            index, _, rest = key.removeprefix("model.layers.").partition(".")
            module, _, kind = rest.rpartition(".")
            if not key.startswith("model.layers.") or module not in LAYER_TENSORS or kind != "weight":
                raise ModelError(f"GGUF export: no llama.cpp name for tensor {key}: {INSTEAD}")
            if module == "self_attn.q_proj":
                tensor = permute_rotary(tensor, heads)
            elif module == "self_attn.k_proj":
                tensor = permute_rotary(tensor, kv_heads)
            yield f"blk.{index}.{LAYER_TENSORS[module]}.weight", tensor


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotate-half layout -> llama.cpp's interleaved pairs, per head (the inverse
    of the GGUF loader's `_reverse_permute_weights`)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def encode(tensor: torch.Tensor, outtype: str):
    """(array, raw GGML type or None): 1-D tensors stay F32, as llama.cpp keeps norms."""
    import gguf

    array = tensor.detach().float().cpu().numpy()
    if array.ndim == 1 or outtype == "f32":
        return array, None
    if outtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """The tokenizer as llama.cpp metadata: byte-level BPE ("gpt2") only."""
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelError("GGUF export supports byte-level BPE tokenizers (GPT-2 style, as SmolLM2's); this one is "
                         f"{backend['model']['type']}: {INSTEAD}")
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges") or []]
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size:
            tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        if index < vocab_size:
            types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(backend.get("pre_tokenizer") or {}, bool(merges)))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges:
        writer.add_token_merges(merges)
    else:  # a pure byte vocabulary: the GGUF loader derives (no) merges from scores
        writer.add_token_scores([0.0] * vocab_size)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def pre_tokenizer_name(pre: dict, has_merges: bool) -> str:
    """llama.cpp's name for how text is split before BPE."""
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and (parts[0].get("use_regex", True) or not has_merges):
        return "gpt2"  # GPT-2's split regex (a byte vocabulary without merges splits the same any way)
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex
    raise ModelError(f"GGUF export cannot describe this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}): "
                     f"{INSTEAD}")


# --- checking --------------------------------------------------------------------------------


@torch.no_grad()
def verify(model: nn.Module, tokenizer, path: Path) -> dict:
    """Reload `path` with transformers' GGUF loader and compare it with `model` on PROBES."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("reloading %s with transformers' GGUF loader to check it", path.name)
    reloaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    reloaded_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROBES]
    same_tokens = sum(tokenizer(t, add_special_tokens=False)["input_ids"] ==
                      reloaded_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    max_diff, agree, positions, greedy_equal = 0.0, 0, 0, 0
    stop = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id or tokenizer.eos_token_id}
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        ours, theirs = model(input_ids=ids).logits[0], reloaded(input_ids=ids).logits[0]
        max_diff = max(max_diff, (ours - theirs).abs().max().item())
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        positions += ids.shape[1]
        mask = torch.ones_like(ids)
        a = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GREEDY_TOKENS, do_sample=False, **stop)
        b = reloaded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=GREEDY_TOKENS, do_sample=False, **stop)
        greedy_equal += torch.equal(a, b)
    return {"prompts": len(texts), "tokenizer_round_trip": f"{same_tokens}/{len(texts)}",
            "max_logit_diff": max_diff, "top1_agreement": agree / positions,
            "greedy_generations_equal": f"{greedy_equal}/{len(texts)}", "greedy_tokens": GREEDY_TOKENS}


def _warning(record: dict) -> str | None:
    problems = []
    if record["tokenizer_round_trip"] != f"{record['prompts']}/{record['prompts']}":
        problems.append(f"the reloaded tokenizer splits {record['tokenizer_round_trip']} probe prompts the same")
    if record["greedy_generations_equal"] != f"{record['prompts']}/{record['prompts']}":
        problems.append(f"greedy generations equal on {record['greedy_generations_equal']} probes")
    if record["top1_agreement"] < 1:
        problems.append(f"top-1 tokens agree on {100 * record['top1_agreement']:.1f}% of positions")
    return "; ".join(problems) or None
