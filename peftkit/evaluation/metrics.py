"""Our metrics as local `evaluate` modules (`eval/metrics/<name>/<name>.py`), loaded by path.

Loading by path never contacts the hub, so metrics work offline; `evaluate` itself is imported
only when a metric is first needed (it takes seconds to import).
"""

import functools
from pathlib import Path
from typing import Any

from peftkit.errors import ConfigError, PeftkitError
from peftkit.presets import builtin_dir


def metrics_dir() -> Path:
    return builtin_dir("eval") / "metrics"


def metric_names() -> list[str]:
    return sorted(p.name for p in metrics_dir().iterdir() if (p / f"{p.name}.py").is_file())


@functools.cache
def load_metric(name: str) -> Any:
    """The `evaluate` module `eval/metrics/<name>`, loaded once per process.

    Raises:
        ConfigError: no such metric.
        PeftkitError: the metric needs a package that is not installed.
    """
    path = metrics_dir() / name
    if not (path / f"{name}.py").is_file():
        raise ConfigError(f"unknown metric {name!r}: use one of {', '.join(metric_names())}")
    import evaluate

    try:
        return evaluate.load(str(path))
    except ImportError as exc:
        raise PeftkitError(f"metric {name} needs a package that is not installed ({str(exc).splitlines()[0]}): "
                           f"pip install sacrebleu rouge_score (or peftkit[dev])") from None


def compute(name: str, predictions: list, references: list, **kwargs: Any) -> dict[str, Any]:
    """Run metric `name` on predictions and references; its own result mapping."""
    return load_metric(name).compute(predictions=predictions, references=references, **kwargs)
