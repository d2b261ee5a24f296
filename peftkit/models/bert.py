"""BERT (MiniLM): a bidirectional encoder; tasks seq-cls (pooler + `classifier`) and token-cls."""

from transformers import BertConfig

from peftkit.models.tiny import PAD_ID, VOCAB_SIZE

# What the lora preset's [q_proj, v_proj] are called here (BERT's attention names them query and value).
QUERY_VALUE = ("query", "value")


def tiny_config() -> BertConfig:
    """2 layers, hidden 64, 4 heads, two labels."""
    return BertConfig(vocab_size=VOCAB_SIZE, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=512, pad_token_id=PAD_ID, num_labels=2)
