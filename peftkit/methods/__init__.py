"""Adapter methods, one module each, every one answering the protocol in `peftkit.protocol`.

Adding a method takes three things:
1. A module here: a config dataclass (`method: ClassVar[str]`, fields checked in
   `__post_init__`), the layer (an `AdapterLayer` from `layer.py` for methods that wrap linear
   layers: parameters under peft's names, `forward`, and `delta_weight` if it merges), and the
   method (a `LayerMethod`: `build`, `peft_fields` and `from_peft_config`, peft's config schema).
2. A preset in `adapters/<name>.yaml` that opens with the command that runs it.
3. One line in `METHODS` below.
Then a parity test against the installed peft (`tests/test_methods.py`: logits both ways,
trainable counts, 20 AdamW steps, merge and unmerge), and `impl: peft` in
`peftkit.peft_backend.peft_config`.
"""

from peftkit.methods.adalora import AdaLoRAMethod
from peftkit.methods.full import FullMethod
from peftkit.methods.hira import HiRAMethod
from peftkit.methods.ia3 import IA3Method
from peftkit.methods.loha import LoHaMethod
from peftkit.methods.lokr import LoKrMethod
from peftkit.methods.lora import LoRAMethod
from peftkit.methods.prefix import PrefixMethod
from peftkit.methods.prompt import PromptMethod
from peftkit.methods.vera import VeRAMethod

METHODS = {method.name: method for method in (
    LoRAMethod(),
    PrefixMethod(),
    PromptMethod(),
    HiRAMethod(),
    IA3Method(),
    VeRAMethod(),
    LoHaMethod(),
    LoKrMethod(),
    AdaLoRAMethod(),
    FullMethod(),  # not an adapter: every parameter trains (peftkit.methods.full)
)}


def method_label(cfg: object) -> str:
    """The name a report shows for an adapter config: LoRA's variants by their own names."""
    if cfg.method == "lora":
        return "qlora" if cfg.quantize else "dora" if cfg.dora else "lora"
    return cfg.method
