"""T5: an encoder-decoder with relative position buckets and untied, unbiased `q`/`k`/`v`/`o`."""

from transformers import T5Config

from peftkit.models.tiny import EOS_ID, PAD_ID, VOCAB_SIZE

# What the lora preset's [q_proj, v_proj] are called here (T5's attention names them q and v).
QUERY_VALUE = ("q", "v")


def tiny_config() -> T5Config:
    """2 encoder and 2 decoder layers, d_model 64, 4 heads of 16, decoding starts from the pad token."""
    return T5Config(vocab_size=VOCAB_SIZE, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                    num_heads=4, eos_token_id=EOS_ID, pad_token_id=PAD_ID, decoder_start_token_id=PAD_ID)
