"""peftkit: parameter-efficient fine-tuning from scratch, interoperable with peft."""

from peftkit.arithmetic import combine_adapters
from peftkit.api import adapter_config, apply_adapter, merge_adapter, trainable_parameters, unmerge_adapter
from peftkit.checkpoint import load_adapter, save_adapter
from peftkit.errors import AdapterError, ConfigError, ModelError, PeftkitError
from peftkit.methods.adalora import AdaLoRAConfig
from peftkit.methods.hira import HiRAConfig
from peftkit.methods.ia3 import IA3Config
from peftkit.methods.lora import LoRAConfig, LoRALinear
from peftkit.methods.prefix import PrefixConfig
from peftkit.methods.prompt import PromptConfig
from peftkit.methods.vera import VeRAConfig
from peftkit.models import list_models, load_model
from peftkit.named import adapters, delete_adapter, disable_adapter, set_adapter
from peftkit.nf4 import Linear4bit, dequantize_nf4, quantize_nf4
from peftkit.protocol import adapter_state_dict, load_adapter_state_dict
from peftkit.swap import swap_adapter

__all__ = [
    "AdaLoRAConfig", "AdapterError", "ConfigError", "HiRAConfig", "IA3Config", "Linear4bit", "LoRAConfig", "LoRALinear", "ModelError", "PeftkitError",
    "PrefixConfig", "PromptConfig", "VeRAConfig", "adapter_config", "adapter_state_dict", "adapters", "apply_adapter", "combine_adapters", "delete_adapter", "disable_adapter", "dequantize_nf4",
    "list_models", "load_adapter", "load_adapter_state_dict", "load_model", "merge_adapter", "quantize_nf4",
    "save_adapter", "set_adapter", "swap_adapter", "trainable_parameters", "unmerge_adapter",
]
__version__ = "0.1.0"
