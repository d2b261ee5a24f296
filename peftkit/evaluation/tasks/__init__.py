"""Eval task implementations, one module each, by the name a spec's `task:` key gives.

Every task module provides `SPEC` (its spec dataclass), `MODEL_TASKS` (the kinds of model it can
score: causal-lm, seq-cls, seq2seq) and `run(model, tokenizer, spec, limit, progress) -> TaskResult`;
the runner resolves data paths, caching and the report around it.
"""

from types import ModuleType

from peftkit.evaluation.tasks import alpaca, e2e, gsm8k, sst2

TASKS: dict[str, ModuleType] = {"sst2": sst2, "e2e": e2e, "gsm8k": gsm8k, "alpaca-heldout": alpaca}
