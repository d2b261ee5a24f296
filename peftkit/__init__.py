"""peftkit: parameter-efficient fine-tuning from scratch, interoperable with peft."""

from peftkit.api import adapter_config, apply_adapter, merge_adapter, trainable_parameters, unmerge_adapter
from peftkit.checkpoint import load_adapter, save_adapter
from peftkit.errors import AdapterError, ConfigError, ModelError, PeftkitError
from peftkit.lora import LoRAConfig, LoRALinear
from peftkit.models import list_models, load_model
from peftkit.nf4 import Linear4bit, dequantize_nf4, quantize_nf4
from peftkit.prefix import PrefixConfig
from peftkit.prompt import PromptConfig
from peftkit.protocol import adapter_state_dict, load_adapter_state_dict

__all__ = [
    "AdapterError", "ConfigError", "Linear4bit", "LoRAConfig", "LoRALinear", "ModelError", "PeftkitError",
    "PrefixConfig", "PromptConfig", "adapter_config", "adapter_state_dict", "apply_adapter", "dequantize_nf4",
    "list_models", "load_adapter", "load_adapter_state_dict", "load_model", "merge_adapter", "quantize_nf4",
    "save_adapter", "trainable_parameters", "unmerge_adapter",
]
__version__ = "0.1.0"
