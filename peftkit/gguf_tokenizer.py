"""A transformers fast tokenizer as GGUF metadata, in the two forms llama.cpp's converter writes.

- `gpt2`: byte-level BPE (SmolLM2, Qwen2, the tiny models): the vocabulary in byte-alphabet
  spelling, the merges (an empty list for a byte vocabulary without any), and llama.cpp's name for
  the pre-tokenizer's split (`tokenizer.ggml.pre`, `peftkit.llamacpp_names.pre_tokenizer`).
- `llama`: SentencePiece-style BPE (Gemma 3): spaces as U+2581, unknown bytes as `<0xNN>` tokens;
  pieces, scores and token types as `_set_vocab_sentencepiece` writes them, no merges (the
  GGUF loader rebuilds them from the pieces' order, llama.cpp merges by score).

Token types follow the tokenizer's added tokens: special ones CONTROL, the others USER_DEFINED,
byte pieces BYTE, ids past the vocabulary `[PAD<i>]` UNUSED.
"""

import json
import re

import gguf

from peftkit.errors import ModelError
from peftkit.llamacpp_names import pre_tokenizer

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
SPACE = "\u2581"  # SentencePiece's visible space


def add_tokenizer(writer, tokenizer, vocab_size: int, allowed: tuple[str, ...], instead: str) -> None:
    """Write `tokenizer` into `writer` as the llama.cpp tokenizer model it is.

    Args:
        writer: a `Writer` (it can write an empty merges list).
        tokenizer: a transformers fast tokenizer.
        vocab_size: rows of the embedding matrix (ids past the tokenizer are padded).
        allowed: the llama.cpp tokenizer models this architecture's export can write.
        instead: the fix hint every refusal ends with.

    Raises:
        ModelError: a tokenizer neither form describes, or one this architecture cannot take.
    """
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    kind = tokenizer_kind(backend)
    if kind not in allowed:
        found = f"a {kind} tokenizer" if kind else \
            f"this {backend['model']['type']} tokenizer (neither byte-level nor SentencePiece-style BPE)"
        raise ModelError(f"GGUF export of this architecture supports {' or '.join(allowed)} tokenizers (llama.cpp's "
                         f"names), not {found}: {instead}")
    tokens, types = token_table(tokenizer, vocab_size, byte_pieces=kind == "llama")
    writer.add_tokenizer_model(kind)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if kind == "gpt2":
        merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"].get("merges") or []]
        writer.add_tokenizer_pre(pre_tokenizer(tokenizer, bool(merges)))
        # an empty list too: llama.cpp refuses a BPE file without the key (see `Writer`)
        writer.add_key_value("tokenizer.ggml.merges", merges, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    else:
        writer.add_tokenizer_pre("default")  # as llama.cpp's converter writes for SentencePiece (which ignores it)
        writer.add_token_scores(piece_scores(backend["model"].get("merges") or [], tokens))
        writer.add_add_space_prefix(False)  # as llama.cpp writes for Gemma 3: no space before the first word
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and probe[0] == tokenizer.bos_token_id)
    if isinstance(tokenizer.chat_template, str):
        writer.add_chat_template(tokenizer.chat_template)


def tokenizer_kind(backend: dict) -> str | None:
    """`gpt2` for byte-level BPE, `llama` for SentencePiece-style BPE, None for anything else."""
    model, decoder = backend["model"], backend.get("decoder") or {}
    if model["type"] != "BPE":
        return None
    if decoder.get("type") == "ByteLevel":
        return "gpt2"
    normalizer = backend.get("normalizer") or {}
    spaces = normalizer.get("type") == "Replace" and normalizer.get("content") == SPACE and \
        normalizer.get("pattern") == {"String": " "}
    return "llama" if model.get("byte_fallback") and spaces else None


def token_table(tokenizer, vocab_size: int, byte_pieces: bool) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0 .. vocab_size - 1."""
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size:
            byte = byte_pieces and BYTE_PIECE.fullmatch(token)
            tokens[index], types[index] = token, gguf.TokenType.BYTE if byte else gguf.TokenType.NORMAL
    for index, added in tokenizer.added_tokens_decoder.items():
        if index < vocab_size:
            types[index] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    if byte_pieces and tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    return tokens, types


def piece_scores(merges: list, tokens: list[str]) -> list[float]:
    """SentencePiece scores from BPE merges: a piece made by merge r scores -r, so llama.cpp's
    highest-score-first merging follows the merge order; pieces no merge makes score 0."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault("".join(merge.split(" ") if isinstance(merge, str) else merge), r)
    return [-float(rank[token]) if token in rank else 0.0 for token in tokens]


class Writer(gguf.GGUFWriter):
    """gguf-py's writer, able to write an empty array.

    Note: gguf-py drops empty arrays (`add_array`) and refuses them (`_pack_val`), but GGUF allows
    them and llama.cpp needs `tokenizer.ggml.merges` in every BPE file, a byte vocabulary with no
    merges included. An empty typed array is its element type and a count of 0.
    """

    def _pack_val(self, val, vtype, add_vtype: bool, sub_type=None) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            return (self._pack("I", vtype) if add_vtype else b"") + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)
