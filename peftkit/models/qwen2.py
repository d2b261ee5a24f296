"""Qwen2 (Qwen2.5): Llama's layout plus biases on q, k and v, and (at 0.5B) an untied head in tiny form.

GGUF export follows llama.cpp's `Qwen2Model` in convert_hf_to_gguf.py: Llama's tensor names plus
the q/k/v biases, and no rotary permutation (llama.cpp runs qwen2 with NeoX-style RoPE, the same
rotate-half layout transformers uses).
"""

import torch
from transformers import Qwen2Config

from peftkit.errors import ModelError
from peftkit.models import llama
from peftkit.models.tiny import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

GGUF_ARCH = "qwen2"
GGUF_TOKENIZERS = ("gpt2",)
GGUF_LAYER_TENSORS = llama.GGUF_LAYER_TENSORS  # the biases take the same names, `.bias` for `.weight`


def tiny_config() -> Qwen2Config:
    """2 layers, hidden 64, 4 query heads sharing 2 key/value heads, q/k/v biases, untied lm_head."""
    return Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       rms_norm_eps=1e-6)


def gguf_check(config: Qwen2Config, instead: str) -> None:
    """Raise ModelError for what llama.cpp's qwen2 layout (or the GGUF reload) cannot carry.

    Args:
        config: the model's config.
        instead: the fix hint every refusal ends with.
    """
    if getattr(config, "use_sliding_window", False):
        raise ModelError(f"GGUF export of Qwen2 models with sliding-window attention is not supported: {instead}")
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export supports plain RoPE, not rope_type {rope['rope_type']!r}: {instead}")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
        raise ModelError(f"GGUF export of Qwen2 needs head_dim = hidden_size / heads (the reload derives it), "
                         f"not {head_dim}: {instead}")


def gguf_metadata(writer, config: Qwen2Config) -> None:
    """The `qwen2.*` keys beyond the ones every family writes."""
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))


def gguf_tensor(name: str, tensor: torch.Tensor, config: Qwen2Config) -> torch.Tensor:
    """Written as they are: llama.cpp's Qwen2Model neither permutes nor offsets any tensor."""
    return tensor
