"""A transformers fast tokenizer as GGUF metadata, in the two forms llama.cpp's converter writes.

- `gpt2`: byte-level BPE (SmolLM2, Qwen2, the tiny models): the vocabulary in byte-alphabet
  spelling, the merges, and llama.cpp's name for the pre-tokenizer's split (`tokenizer.ggml.pre`).
- `llama`: SentencePiece-style BPE (Gemma 3): spaces as U+2581, unknown bytes as `<0xNN>` tokens;
  pieces, scores and token types as `_set_vocab_sentencepiece` writes them, no merges (the
  GGUF loader rebuilds them from the pieces' order, llama.cpp merges by score).

Token types follow the tokenizer's added tokens: special ones CONTROL, the others USER_DEFINED,
byte pieces BYTE, ids past the vocabulary `[PAD<i>]` UNUSED.
"""

import json
import re

from peftkit.errors import ModelError

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
SPACE = "\u2581"  # SentencePiece's visible space


def add_tokenizer(writer, tokenizer, vocab_size: int, allowed: tuple[str, ...], instead: str) -> None:
    """Write `tokenizer` into `writer` as the llama.cpp tokenizer model it is.

    Args:
        writer: a `gguf.GGUFWriter`.
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
        writer.add_tokenizer_pre(pre_tokenizer_name(backend.get("pre_tokenizer") or {}, bool(merges), instead))
        if merges:
            writer.add_token_merges(merges)
        else:  # a pure byte vocabulary: the GGUF loader derives (no) merges from scores
            writer.add_token_scores([0.0] * vocab_size)
    else:
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
    import gguf

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


def pre_tokenizer_name(pre: dict, has_merges: bool, instead: str) -> str:
    """llama.cpp's name for how text is split before byte-level BPE."""
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and (parts[0].get("use_regex", True) or not has_merges):
        return "gpt2"  # GPT-2's split regex (a byte vocabulary without merges splits the same any way)
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's regex
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True) and \
            parts[0].get("behavior") == "Isolated" and not parts[0].get("invert"):
        name = split_names().get(parts[0].get("pattern", {}).get("Regex"))
        if name is not None:
            return name
    raise ModelError(f"GGUF export cannot describe this tokenizer's pre-tokenizer ({' + '.join(map(str, kinds))}): "
                     f"{instead}")


def split_names() -> dict[str, str]:
    """Split regex -> llama.cpp pre-tokenizer name, from the table transformers' GGUF loader
    splits by (first name wins: `qwen2`, `llama3`, ...), so the reload splits as the source did."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    names = {}
    for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
        names.setdefault(regex, name)
    return names
