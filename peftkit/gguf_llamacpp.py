"""llama.cpp itself reads a GGUF export and is measured against the model it came from.

Needs the `llama_cpp` module (llama-cpp-python) on a built llama.cpp: `bench/llamacpp.py` builds
the one its sdist vendors once and installs the binding without compiling (see its docstring), or
`pip install llama-cpp-python` builds both. On fixed prompts, plain and in the chat template
(English, digits, code and whitespace, non-ASCII text and emoji):
- llama.cpp's token ids equal transformers' (`token_ids_equal`);
- fed transformers' ids, the top-1 token agrees at every prompt position (`top1_agreement`; where
  it does not, `top1_flip_margin` is the largest gap between the model's best two logits there:
  a flip is benign when that gap is within the rounding, `max_logit_diff`);
- its greedy continuation of `GREEDY_TOKENS` tokens equals transformers' (`greedy_equal`; where
  one parts, `greedy_split_margin` is the gap between the model's best two logits at that step).

Note: llama.cpp runs on one thread (`n_threads` and `n_threads_batch`). Beside torch on a
shared 2-core machine, two threads took 9.4 s a prompt instead of 0.08 s (its threads spin).
"""

import ctypes
import os
import re
import sys
import time
from functools import cache
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig

from peftkit.errors import ConfigError
from peftkit.models.fetch import cache_dir

PROMPTS = [
    "What is the capital of France?",
    "In 2024, 17 of the 1,000 apples cost $4.50 each; what do 333 cost?",
    "Naïve café façade: Größe, 東京タワー, Привет мир, 🚀🦙 ✅",
    "def add(a, b):\n    return a + b\n\n\tprint(add(2, 3))",
    "  Two leading spaces,   runs  of spaces\n\n\nand blank lines.",
]
GREEDY_TOKENS = 32
NO_BINDING = ("llama.cpp check needs the llama_cpp module: run `python bench/llamacpp.py --build` once (builds "
              "llama.cpp into the peftkit cache and installs the binding there), or `pip install llama-cpp-python`")


LOG: list[str] = []  # llama.cpp's warnings and errors since the last `load`
_CALLBACKS: list = []  # Note: llama.cpp keeps only a pointer to the log callback; this keeps it alive


@cache
def load_binding() -> ModuleType:
    """The `llama_cpp` module: importable as installed, or the one `bench/llamacpp.py` built into the
    cache (the newest version there). llama.cpp's log goes to `LOG` (warnings and errors), not to
    the terminal.

    Raises:
        ConfigError: no `llama_cpp` module, or one whose llama.cpp library cannot be loaded.
    """
    try:
        try:
            import llama_cpp
        except ImportError:
            built = sorted((cache_dir() / "llamacpp").glob("*/python/llama_cpp"),
                           key=lambda path: tuple(int(p) for p in re.findall(r"\d+", path.parents[1].name)))
            if not built:
                raise ConfigError(NO_BINDING) from None
            os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(built[-1].parents[1] / "build" / "bin"))
            sys.path.insert(0, str(built[-1].parent))
            import llama_cpp
    except (OSError, RuntimeError) as exc:  # the module is there, its library is not (or does not load)
        raise ConfigError(f"{NO_BINDING} ({' '.join(str(exc).split())})") from None

    @llama_cpp.llama_log_callback
    def keep(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        if level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR (ggml.h)
            LOG.append(text.decode("utf-8", errors="replace").strip())

    llama_cpp.llama_log_set(keep, ctypes.c_void_p(0))
    _CALLBACKS.append(keep)
    return llama_cpp


def texts(tokenizer) -> list[tuple[str, str]]:
    """(kind, text): each prompt plain, then in the tokenizer's chat template where it has one."""
    if not isinstance(tokenizer.chat_template, str):
        return [("plain", p) for p in PROMPTS]
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=False) for p in PROMPTS]
    return [("plain", p) for p in PROMPTS] + [("chat", c) for c in chat]


def load(path: Path, context: int):
    """(a llama_cpp.Llama on `path` with room for `context` tokens, None), or (None, llama.cpp's
    own reason it refused the file)."""
    llama_cpp = load_binding()
    LOG.clear()
    try:
        llm = llama_cpp.Llama(str(path), n_ctx=context, n_batch=context, n_threads=1, n_threads_batch=1,
                              logits_all=True, verbose=False)
    except ValueError as exc:
        return None, next((line for line in LOG if "error loading model" in line), LOG[-1] if LOG else str(exc))
    return llm, None


@torch.no_grad()
def check(model: nn.Module, tokenizer, path: Path) -> dict:
    """Load `path` in llama.cpp and compare it with `model` (see the module docstring).

    Args:
        model: the model the file was written from (fp32, on the CPU).
        tokenizer: its tokenizer.
        path: the GGUF file.

    Returns:
        `reader` (which llama.cpp), `loads`, and when it loads: `prompts`, `token_ids_equal` and
        `greedy_equal` as "k/n", `greedy_split_margin`, `top1_agreement`, `top1_flip_margin`,
        `max_logit_diff`, `greedy_tokens`, `seconds`; when it does not: `error`, llama.cpp's reason.

    Raises:
        ConfigError: no `llama_cpp` module (the message says how to get one).
    """
    llama_cpp = load_binding()
    started = time.perf_counter()
    record = {"reader": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"}
    prompts = [(kind, text, tokenizer(text, add_special_tokens=kind == "plain")["input_ids"])
               for kind, text in texts(tokenizer)]
    # the scores buffer is context x vocabulary floats: no more context than the longest prompt needs
    llm, error = load(path, max(len(ids) for *_, ids in prompts) + GREEDY_TOKENS + 1)
    record["loads"] = llm is not None
    if llm is None:
        return {**record, "error": error}
    try:
        found = [measure(model, tokenizer, llm, kind, text, ids) for kind, text, ids in prompts]
    finally:
        llm.close()
    positions = sum(len(ids) for *_, ids in prompts)
    return {**record, "prompts": len(prompts),
            "token_ids_equal": f"{sum(f['same_ids'] for f in found)}/{len(prompts)}",
            "greedy_equal": f"{sum(f['same_greedy'] for f in found)}/{len(prompts)}",
            "greedy_split_margin": max(f["split_margin"] for f in found), "greedy_tokens": GREEDY_TOKENS,
            "top1_agreement": sum(f["agree"] for f in found) / positions,
            "top1_flip_margin": max(f["flip_margin"] for f in found),
            "max_logit_diff": max(f["max_diff"] for f in found), "seconds": round(time.perf_counter() - started, 1)}


def measure(model: nn.Module, tokenizer, llm, kind: str, text: str, ids: list[int]) -> dict:
    """One prompt: token ids, logits over its positions (fed transformers' ids), greedy continuations."""
    same_ids = llm.tokenize(text.encode(), add_bos=kind == "plain", special=True) == ids
    ours = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
    llm.reset()
    llm.eval(ids)
    theirs = np.asarray(llm.scores[:len(ids)], dtype=np.float32)
    same = ours.argmax(-1) == theirs.argmax(-1)
    flip_margin = 0.0
    if not same.all():  # how close the model's best two tokens were where llama.cpp picked another
        best = np.sort(ours[~same], axis=-1)[:, -2:]
        flip_margin = float((best[:, 1] - best[:, 0]).max())
    eos = tokenizer.eos_token_id
    plain_greedy = GenerationConfig(do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=eos,
                                    pad_token_id=tokenizer.pad_token_id or eos)  # no penalties: argmax only
    reference = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               generation_config=plain_greedy, output_scores=True, return_dict_in_generate=True)
    wanted, got = reference.sequences[0, len(ids):].tolist(), greedy(llm, theirs[-1], eos)
    parted = next((k for k, (a, b) in enumerate(zip(wanted, got)) if a != b), None)
    split_margin = 0.0
    if parted is not None:  # how close the model's best two tokens were where the continuations part
        best = reference.scores[parted][0].topk(2).values
        split_margin = float(best[0] - best[1])
    return {"same_ids": same_ids, "agree": int(same.sum()), "flip_margin": flip_margin,
            "max_diff": float(np.abs(ours - theirs).max()), "same_greedy": wanted == got, "split_margin": split_margin}


def greedy(llm, last_logits: np.ndarray, eos: int | None) -> list[int]:
    """llama.cpp's greedy continuation of the evaluated prompt; it ends after `eos`, as transformers' does."""
    out = []
    token = int(last_logits.argmax())
    while True:
        out.append(token)
        if token == eos or len(out) == GREEDY_TOKENS:
            return out
        llm.eval([token])
        token = int(np.asarray(llm.scores[llm.n_tokens - 1]).argmax())
