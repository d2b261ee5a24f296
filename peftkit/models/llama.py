"""Llama (SmolLM2): the family every other decoder is checked against.

GGUF export follows llama.cpp's `LlamaModel` in convert_hf_to_gguf.py: no biases, and the query and
key rows permuted from transformers' rotate-half layout to llama.cpp's interleaved pairs.
"""

import torch
from transformers import LlamaConfig

from peftkit.errors import ModelError
from peftkit.models.tiny import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

GGUF_ARCH = "llama"
GGUF_TOKENIZERS = ("gpt2",)  # llama.cpp tokenizer models this family's export can write
GGUF_LAYER_TENSORS = {  # transformers name inside model.layers.N -> llama.cpp name inside blk.N
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def tiny_config() -> LlamaConfig:
    """2 layers, hidden 64, 4 query heads sharing 2 key/value heads, tied embeddings."""
    return LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=True, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       rms_norm_eps=1e-5)


def gguf_check(config: LlamaConfig, instead: str) -> None:
    """Raise ModelError for what llama.cpp's llama layout (or the GGUF reload) cannot carry.

    Args:
        config: the model's config.
        instead: the fix hint every refusal ends with.
    """
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ModelError(f"GGUF export of Llama models with attention or MLP biases is not supported: {instead}")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ModelError(f"GGUF export supports plain RoPE, not rope_type {rope['rope_type']!r}: {instead}")


def gguf_metadata(writer, config: LlamaConfig) -> None:
    """The `llama.*` keys beyond the ones every family writes."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def gguf_tensor(name: str, tensor: torch.Tensor, config: LlamaConfig) -> torch.Tensor:
    """Query and key rows permuted per head as llama.cpp's converter does; the rest unchanged."""
    if name.endswith(".attn_q.weight"):
        return permute_rotary(tensor, config.num_attention_heads)
    if name.endswith(".attn_k.weight"):
        return permute_rotary(tensor, config.num_key_value_heads)
    return tensor


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """transformers' rotate-half layout -> llama.cpp's interleaved pairs, per head (the inverse
    of the GGUF loader's `_reverse_permute_weights`)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
