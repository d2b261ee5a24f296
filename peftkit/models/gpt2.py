"""GPT-2: attention and MLP layers are transformers' `Conv1D` (weight stored (in, out)), which LoRA
wraps with peft's `fan_in_fan_out`; learned absolute positions; a fused `c_attn` for q, k, v."""

from transformers import GPT2Config

from peftkit.models.tiny import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

# What the lora preset's [q_proj, v_proj] are called here (GPT-2 computes q, k and v in one
# fused c_attn layer, which peft targets).
QUERY_VALUE = ("c_attn",)


def tiny_config() -> GPT2Config:
    """2 layers, hidden 64, 4 heads, tied embeddings."""
    return GPT2Config(vocab_size=VOCAB_SIZE, n_positions=512, n_embd=64, n_layer=2, n_head=4,
                      bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
