"""What llama.cpp accepts in a GGUF file, read from its source, and the checks every export passes.

`llamacpp_names.json` beside this file is extracted from the llama.cpp that llama-cpp-python
vendors (its version and commit are in the file) by `bench/llamacpp.py --update-names`; the
`llamacpp` tests check that it still equals that source. It holds:
- `chktxt` and `pre_tokenizer_hashes`: how llama.cpp's converter (`get_vocab_base_pre` in
  convert_hf_to_gguf) recognises a byte-level BPE tokenizer, by the sha256 of the token ids it
  gives that text;
- `pre_tokenizers` and `tokenizer_models`: the values llama-vocab.cpp accepts for
  `tokenizer.ggml.pre` (any other fails the load: "unknown pre-tokenizer type") and
  `tokenizer.ggml.model`;
- `architectures`, `keys` (`%s` is the architecture) and `tensors` (`%d` a block index): the
  names in llama-arch.cpp. llama.cpp ignores a key it does not know, so a misspelt one is a
  silent loss; every key an export writes must be one of these.
"""

import hashlib
import json
import re
from functools import cache
from pathlib import Path

from peftkit.errors import ModelError
from peftkit.models.fetch import GGUF_PRE_KEY
BYTE_VOCAB_PRE = "gpt-2"  # any name splits a vocabulary without merges the same way: one token per byte
TENSOR_KINDS = ("weight", "bias")


@cache
def names() -> dict:
    """The table in `llamacpp_names.json` (see the module docstring)."""
    return json.loads(Path(__file__).with_name("llamacpp_names.json").read_text())


def source() -> str:
    """Which llama.cpp the names come from, for records and messages."""
    return f"llama.cpp {names()['llama_cpp']} (vendored by llama-cpp-python {names()['llama_cpp_python']})"


def pre_tokenizer(tokenizer, has_merges: bool) -> str:
    """llama.cpp's name for how `tokenizer` splits text before byte-level BPE (`tokenizer.ggml.pre`).

    In order: the name the GGUF file the model came from gave (recorded in the tokenizer's config
    when peftkit cached it); the name llama.cpp's converter recognises by hashing the token ids of
    its check text; for a byte vocabulary without merges (the tiny models), `gpt-2`, since no split
    changes which tokens such a vocabulary gives.

    Args:
        tokenizer: a transformers fast tokenizer with a byte-level BPE model.
        has_merges: whether its BPE model has merges.

    Returns:
        One of the names llama.cpp accepts for `tokenizer.ggml.pre`.

    Raises:
        ModelError: llama.cpp would not recognise this tokenizer (the converter refuses it too).
    """
    recorded = tokenizer.init_kwargs.get(GGUF_PRE_KEY)
    if recorded in names()["pre_tokenizers"]:
        return recorded
    digest = check_hash(tokenizer)
    recognised = names()["pre_tokenizer_hashes"].get(digest)
    if recognised in names()["pre_tokenizers"]:  # two of the converter's names are BERT's, which BPE rejects
        return recognised
    if not has_merges:
        return BYTE_VOCAB_PRE
    raise ModelError(f"llama.cpp does not recognise the pre-tokenizer of tokenizer {tokenizer.name_or_path!r} (its "
                     f"check hash {digest[:16]}... is none of the {len(names()['pre_tokenizer_hashes'])} known to "
                     f"{source()}), so it would refuse the file: if llama.cpp splits text as this tokenizer does under "
                     f"a name of its own, set \"{GGUF_PRE_KEY}\" to that name in the tokenizer's "
                     f"tokenizer_config.json (llama.cpp's convert_hf_to_gguf_update.py adds new tokenizers)")


def check_hash(tokenizer) -> str:
    """sha256 of the token ids of `chktxt`, as the converter computes it (`tokenizer.encode`, specials included)."""
    return hashlib.sha256(str(tokenizer.encode(names()["chktxt"])).encode()).hexdigest()


def problems(fields: dict[str, object], tensors: list[str]) -> list[str]:
    """What llama.cpp would refuse or ignore in a GGUF file with these metadata values and tensor names.

    Args:
        fields: metadata key -> value (strings compared, others only named).
        tensors: the file's tensor names (checked against every architecture's names).

    Returns:
        One sentence per problem; empty when there is none.
    """
    table, found = names(), []
    arch = fields.get("general.architecture")
    if arch not in table["architectures"]:
        return [f"general.architecture {arch!r} is not an architecture llama.cpp knows"]
    known = {key.replace("%s", str(arch)) for key in table["keys"]}
    found += [f"metadata key {key} is not one llama.cpp reads" for key in fields if key not in known]
    for key, allowed in (("tokenizer.ggml.model", "tokenizer_models"), ("tokenizer.ggml.pre", "pre_tokenizers")):
        if key in fields and fields[key] not in table[allowed]:
            found.append(f"{key} {fields[key]!r} is not a value llama.cpp accepts")
    pattern = tensor_pattern()
    found += [f"tensor {name} has no llama.cpp name" for name in tensors if not pattern.fullmatch(name)]
    return found


@cache
def tensor_pattern() -> re.Pattern:
    """One regex for every tensor name llama.cpp knows (`%d` a block index), with `.weight` or `.bias`."""
    names_ = (re.escape(name).replace("%d", r"\d+") for name in names()["tensors"])
    return re.compile(f"(?:{'|'.join(names_)})\\.(?:{'|'.join(TENSOR_KINDS)})")


def file_problems(path: Path) -> list[str]:
    """`problems` of a written GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {key: field.contents() if key in ("general.architecture", "tokenizer.ggml.model", "tokenizer.ggml.pre")
              else None for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    return problems(fields, [tensor.name for tensor in reader.tensors])
