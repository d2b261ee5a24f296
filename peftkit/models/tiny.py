"""Tiny deterministic random models (`tiny-llama`, `tiny-gpt2`, `tiny-qwen2`, `tiny-gemma3`,
`tiny-bert`, `tiny-t5`), built in-process in milliseconds from each family's `tiny_config`.

Unit tests exercise the same code paths as the real models (GQA, tied or untied embeddings,
RoPE, Conv1D, sliding windows, encoders, encoder-decoders) without any download. Every tiny
model shares one byte-level tokenizer with no merges: every UTF-8 byte is one token, so any
text round-trips; it carries SmolLM2's chat template.
"""

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from peftkit.models.tasks import auto_class

# The same special tokens (and ids 0, 1, 2) and chat template as SmolLM2-Instruct.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SEED = 0
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
BOS_ID, EOS_ID, PAD_ID = 1, 2, 2


def tiny_model(config: PretrainedConfig, task: str, num_labels: int | None, name: str) -> PreTrainedModel:
    """The same weights on every call and every machine, without touching the global RNG.

    Args:
        config: the family's tiny config (see `peftkit.models.families`).
        task: one of `peftkit.models.tasks.TASKS`; the head is part of the seeded weights.
        num_labels: classes of a `seq-cls` / `token-cls` head.
        name: the registry name, recorded as the model's `name_or_path`.
    """
    if num_labels is not None:
        config.num_labels = num_labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = auto_class(task, name).from_config(config)
    model.name_or_path = name
    return model.eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level, ids 0-2 special (`<|endoftext|>`, `<|im_start|>`, `<|im_end|>`, the last also padding)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.name_or_path = "tiny"
    return tokenizer
