"""Adapter presets: a shipped name (`adapters/*.yaml`), a path to a YAML file, or a mapping."""

import dataclasses
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from peftkit.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
# peft's field names and common synonyms, for the "did you mean" hint
ALIASES = {"rank": "r", "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "use_rslora": "rslora",
           "use_dora": "dora", "init_lora_weights": "init", "target": "target_modules", "targets": "target_modules"}


def builtin_dir(kind: str) -> Path:
    """Where shipped YAML lives: inside the wheel, or at the repo root in a source checkout."""
    packaged = PACKAGE_DIR / "_builtin" / kind
    return packaged if packaged.is_dir() else PACKAGE_DIR.parent / kind


def builtin_names(kind: str) -> list[str]:
    return sorted(p.stem for p in builtin_dir(kind).glob("*.yaml"))


def read_yaml(path: Path) -> dict:
    """A YAML mapping from disk; a one-line error for a missing, unreadable or non-mapping file."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}): check the file") from exc
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(f"{path} is not valid YAML{line}: fix the syntax") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def load_preset(spec: str | Path | Mapping[str, Any]) -> dict:
    """The raw preset mapping for a shipped name, a YAML path, or a mapping."""
    if isinstance(spec, Mapping):
        return dict(spec)
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return read_yaml(path)
    shipped = builtin_dir("adapters") / f"{spec}.yaml"
    if shipped.is_file():
        return read_yaml(shipped)
    names = builtin_names("adapters")
    close = difflib.get_close_matches(str(spec), names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown adapter preset {str(spec)!r}: {hint}use one of {', '.join(names)} or a path to a YAML file")


def build_config(config_class: type, values: Mapping[str, Any], where: str = "adapter") -> Any:
    """A config dataclass from a mapping; unknown keys are rejected with the closest valid key."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    for key in values:
        if key not in fields:
            close = [ALIASES[key]] if ALIASES.get(key) in fields else difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown key {where}.{key}: {hint}")
    try:
        return config_class(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
