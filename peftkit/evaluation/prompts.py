"""Chat-formatted token ids: generation prompts, and completion-only labels for losses.

Prompts always go through the model's own chat template, so an instruct model sees what it was
trained on. In-context examples are prior (user, assistant) turns. Token ids are built as
tokens(prompt) + tokens(answer) rather than tokens(prompt + answer), so the boundary between the
masked prompt and the scored answer is exact whatever the tokenizer merges.
"""

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from peftkit.errors import ConfigError

IGNORE_INDEX = -100  # labels with this value are left out of the loss (PyTorch's cross_entropy default)


def messages(turns: Sequence[tuple[str, str]], user: str, answer: str | None = None) -> list[dict[str, str]]:
    """Chat messages: each (user, assistant) turn, then the user message and, if given, the answer."""
    chat = []
    for shot_user, shot_answer in turns:
        chat += [{"role": "user", "content": shot_user}, {"role": "assistant", "content": shot_answer}]
    chat.append({"role": "user", "content": user})
    if answer is not None:
        chat.append({"role": "assistant", "content": answer})
    return chat


def _render(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: evaluation "
                          f"prompts need an instruct (chat) model such as smollm2-135m")
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat ending with a user message, followed by the assistant's turn opener."""
    return _encode(tokenizer, _render(tokenizer, chat, add_generation_prompt=True))


def generation_prompt_ids(model, tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]]) -> list[int]:
    """What a model generates from: a decoder's chat prompt (`prompt_ids`), or an encoder-decoder's
    source, the chat's text as seq2seq training formats it (`peftkit.data_tasks.source_text`)."""
    if getattr(model.config, "is_encoder_decoder", False):
        from peftkit.data_tasks import source_text

        return tokenizer(source_text(chat))["input_ids"]
    return prompt_ids(tokenizer, chat)


def chat_example(tokenizer: PreTrainedTokenizerBase, chat: list[dict[str, str]],
                 max_length: int | None = None) -> tuple[list[int], list[int]]:
    """Input ids and completion-only labels for a chat that ends with the assistant's answer.

    Every label is `IGNORE_INDEX` except the final answer's tokens and the end-of-turn token the
    template closes it with (the first special token after the answer, e.g. `<|im_end|>`), so the
    model is scored, or trained, on answering and on stopping. What the template writes after
    the end-of-turn token (a newline) is masked.

    Args:
        tokenizer: a tokenizer with a chat template.
        chat: messages ending with an assistant message.
        max_length: cut both lists to this many tokens (None keeps all).

    Returns:
        (input_ids, labels), the same length.

    Raises:
        ConfigError: the last message is not the assistant's, or the template renders the answer
            in a way that does not extend the generation prompt.
    """
    if not chat or chat[-1]["role"] != "assistant":
        raise ConfigError("chat_example needs a chat that ends with an assistant message")
    prompt = _render(tokenizer, chat[:-1], add_generation_prompt=True)
    full = _render(tokenizer, chat, add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ConfigError(f"the chat template of {getattr(tokenizer, 'name_or_path', 'this tokenizer')!r} does not "
                          f"render an answer after its generation prompt: completion-only labels need one that does")
    head, tail = _encode(tokenizer, prompt), _encode(tokenizer, full[len(prompt):])
    special = set(tokenizer.all_special_ids)
    answer_len = next((i + 1 for i, token in enumerate(tail) if token in special), len(tail))
    ids = head + tail
    labels = [IGNORE_INDEX] * len(head) + tail[:answer_len] + [IGNORE_INDEX] * (len(tail) - answer_len)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id: the tokenizer's own, else its end-of-sequence id."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
    return pad
