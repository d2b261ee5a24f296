"""Qwen2 (Qwen2.5): Llama's layout plus biases on q, k and v, and (at 0.5B) an untied head in tiny form."""

from transformers import Qwen2Config

from peftkit.models.tiny import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE


def tiny_config() -> Qwen2Config:
    """2 layers, hidden 64, 4 query heads sharing 2 key/value heads, q/k/v biases, untied lm_head."""
    return Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                       tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                       rms_norm_eps=1e-6)
