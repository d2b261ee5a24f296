"""Gemma 3 (text): one key/value head, head_dim wider than hidden / heads, q/k norms, sliding-window
layers interleaved with global ones, embeddings scaled by sqrt(hidden), norms stored as (w - 1)."""

from transformers import Gemma3TextConfig

from peftkit.models.tiny import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE


def tiny_config() -> Gemma3TextConfig:
    """2 layers (sliding window 8, then global), hidden 64, 4 query heads over 1 key/value head of dim 32."""
    return Gemma3TextConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                            max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=BOS_ID,
                            eos_token_id=EOS_ID, pad_token_id=PAD_ID)
