"""Gemma 3 (text): one key/value head, head_dim wider than hidden / heads, q/k norms, sliding-window
layers interleaved with global ones, embeddings scaled by sqrt(hidden), norms stored as (w - 1).

GGUF export follows llama.cpp's `Gemma3Model` in convert_hf_to_gguf.py: every norm written as
w + 1 (transformers computes x * (1 + w), llama.cpp x * w; the GGUF loader subtracts the 1 back),
no rotary permutation, key/value length = head_dim, the global layers' RoPE base, the sliding
window. The embedding scale is not written: both transformers and llama.cpp apply sqrt(hidden)
in the forward pass. llama.cpp fixes what the file cannot say, so the export refuses models that
differ: every 6th layer global, a local RoPE base of 10000, a query scale of 1/sqrt(head_dim).
"""

import torch
from transformers import Gemma3TextConfig

from peftkit.errors import ModelError
from peftkit.models.tiny import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

GGUF_ARCH = "gemma3"
GGUF_TOKENIZERS = ("gpt2", "llama")  # llama.cpp writes SentencePiece ("llama") or, without one, GPT-2 BPE
GGUF_LAYER_TENSORS = {  # transformers name inside model.layers.N -> llama.cpp name inside blk.N
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
SWA_PATTERN = 6  # llama.cpp's gemma3: layers 6, 12, ... are global, the rest slide
LOCAL_ROPE_BASE = 10000.0  # llama.cpp's gemma3 hard-codes the sliding layers' RoPE base
LAYERS_27B = 62  # llama.cpp scales queries by 1/sqrt(hidden / heads) for the 27B model, found by its depth


def tiny_config() -> Gemma3TextConfig:
    """2 layers (sliding window 8, then global), hidden 64, 4 query heads over 1 key/value head of dim 32."""
    return Gemma3TextConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                            max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=BOS_ID,
                            eos_token_id=EOS_ID, pad_token_id=PAD_ID)


def gguf_check(config: Gemma3TextConfig, instead: str) -> None:
    """Raise ModelError for what llama.cpp's gemma3 layout cannot carry.

    Args:
        config: the model's config.
        instead: the fix hint every refusal ends with.
    """
    layers = config.num_hidden_layers
    expected = ["sliding_attention" if (i + 1) % SWA_PATTERN else "full_attention" for i in range(layers)]
    if list(config.layer_types) != expected:
        globals_ = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
        raise ModelError(f"GGUF export of Gemma 3 needs every {SWA_PATTERN}th layer global, as llama.cpp assumes; "
                         f"this model's global layers are {globals_}: {instead}")
    scale = config.hidden_size // config.num_attention_heads if layers == LAYERS_27B else config.head_dim
    if config.query_pre_attn_scalar != scale:
        raise ModelError(f"GGUF export of Gemma 3 needs query_pre_attn_scalar = {scale} (llama.cpp derives it), "
                         f"not {config.query_pre_attn_scalar}: {instead}")
    rope = config.rope_parameters
    if any(part.get("rope_type", "default") != "default" for part in rope.values()):
        raise ModelError(f"GGUF export of Gemma 3 supports plain RoPE, not {rope}: {instead}")
    if rope["sliding_attention"]["rope_theta"] != LOCAL_ROPE_BASE:
        raise ModelError(f"GGUF export of Gemma 3 needs the sliding layers' rope_theta {LOCAL_ROPE_BASE:g} "
                         f"(llama.cpp's), not {rope['sliding_attention']['rope_theta']:g}: {instead}")
    if config.attn_logit_softcapping is not None or config.use_bidirectional_attention:
        raise ModelError(f"GGUF export of Gemma 3 supports neither attention logit soft-capping nor "
                         f"bidirectional attention: {instead}")
    if config.hidden_activation != "gelu_pytorch_tanh":
        raise ModelError(f"GGUF export of Gemma 3 needs hidden_activation gelu_pytorch_tanh (llama.cpp's), not "
                         f"{config.hidden_activation!r}: {instead}")


def gguf_metadata(writer, config: Gemma3TextConfig) -> None:
    """The `gemma3.*` keys beyond the ones every family writes."""
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["full_attention"]["rope_theta"]))
    writer.add_sliding_window(config.sliding_window)
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def gguf_tensor(name: str, tensor: torch.Tensor, config: Gemma3TextConfig) -> torch.Tensor:
    """Every norm (q/k norms included) as w + 1, as llama.cpp's converter writes it."""
    return tensor + 1 if name.endswith("norm.weight") else tensor
