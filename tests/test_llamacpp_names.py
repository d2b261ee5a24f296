"""GGUF exports name what llama.cpp names: `tokenizer.ggml.pre` as llama.cpp's converter derives
it (the source GGUF's value, else the hash of the check text's token ids), and every metadata
key, tensor name and tokenizer value among those llama.cpp's source accepts
(`peftkit/llamacpp_names.json`, extracted from it; the `llamacpp` tests load the files in
llama.cpp itself)."""

import json
import sys

import gguf
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import peftkit
from peftkit import llamacpp_names
from peftkit.errors import ConfigError, ModelError
from peftkit.export import export
from peftkit.models import fetch
from peftkit.models.fetch import GGUF_PRE_KEY
from tests.test_export import gemma3_exportable, saved_adapter, spm_tokenizer


def fields_of(path):
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def trained_byte_level_bpe():
    """A byte-level BPE tokenizer with merges of its own: llama.cpp's converter knows no hash for it."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = ["the quick brown fox jumps over the lazy dog", "peftkit writes gguf files"] * 4
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                           special_tokens=["<|endoftext|>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")
    tokenizer.chat_template = peftkit.load_model("tiny-llama")[1].chat_template
    return tokenizer


def test_the_table_is_consistent():
    table = llamacpp_names.names()
    assert table["llama_cpp_python"] == "0.3.36" and len(table["pre_tokenizer_hashes"]) >= 90
    # every name the converter writes for a BPE tokenizer is one llama.cpp's BPE loader accepts;
    # the two exceptions name BERT (WordPiece) tokenizers, whose pre-tokenizer llama.cpp ignores
    unaccepted = set(table["pre_tokenizer_hashes"].values()) - set(table["pre_tokenizers"])
    assert unaccepted == {"bert-bge-large", "jina-v2-en"}
    assert {"smollm", "qwen2", "gpt-2", "llama-bpe"} <= set(table["pre_tokenizers"])
    assert "gpt2" not in table["pre_tokenizers"]  # what peftkit wrote before: llama.cpp refused the file
    assert {"gpt2", "llama"} <= set(table["tokenizer_models"]) and {"llama", "qwen2", "gemma3"} <= set(table["architectures"])


def test_problems_name_what_llamacpp_would_refuse_or_ignore():
    ok = {"general.architecture": "llama", "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
          "llama.rope.freq_base": None, "tokenizer.ggml.merges": None}
    assert llamacpp_names.problems(ok, ["token_embd.weight", "blk.11.attn_q.weight", "blk.0.attn_k.bias"]) == []
    bad = {**ok, "tokenizer.ggml.pre": "gpt2", "llama.rope.freq_bse": None, "qwen2.context_length": None}
    assert llamacpp_names.problems(bad, ["blk.0.q_proj.weight", "blk.0.attn_q.scale"]) == [
        "metadata key llama.rope.freq_bse is not one llama.cpp reads",
        "metadata key qwen2.context_length is not one llama.cpp reads",
        "tokenizer.ggml.pre 'gpt2' is not a value llama.cpp accepts",
        "tensor blk.0.q_proj.weight has no llama.cpp name", "tensor blk.0.attn_q.scale has no llama.cpp name"]
    assert llamacpp_names.problems({"general.architecture": "llamma"}, []) == [
        "general.architecture 'llamma' is not an architecture llama.cpp knows"]


@pytest.mark.slow
def test_smollm2_exports_as_llamacpp_names_it(smol_dir, tmp_path):
    """The regression: SmolLM2's file said `gpt2`, and llama.cpp refused to load it."""
    tokenizer = AutoTokenizer.from_pretrained(smol_dir)
    assert llamacpp_names.check_hash(tokenizer) == "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    tokenizer.init_kwargs.pop(GGUF_PRE_KEY, None)  # a cache built before the source's name was kept
    assert llamacpp_names.pre_tokenizer(tokenizer, True) == "smollm"  # recognised by its hash
    adapter = saved_adapter(tmp_path / "adapter", "smollm2-135m", std=0.01)
    record = export(adapter, outtype="q8_0", out=tmp_path / "smol.gguf")
    fields = fields_of(tmp_path / "smol.gguf")
    assert fields["tokenizer.ggml.pre"] == "smollm" and len(fields["tokenizer.ggml.merges"]) == 48900
    assert llamacpp_names.file_problems(tmp_path / "smol.gguf") == []
    assert any(reader.startswith("llama.cpp 0c1e57098") for reader in record["checked_by"])


@pytest.mark.parametrize("source", ["tiny-llama", "tiny-qwen2", "gemma3", "gemma3-spm"])
def test_every_tiny_export_passes(source, tmp_path):
    if source.startswith("gemma3"):
        source = gemma3_exportable(tmp_path / "model", spm_tokenizer() if source == "gemma3-spm" else None)
    record = export(source, outtype="f16", out=tmp_path / "m.gguf")
    fields = fields_of(tmp_path / "m.gguf")
    assert llamacpp_names.file_problems(tmp_path / "m.gguf") == [] and record["warning"] is None
    if fields["tokenizer.ggml.model"] == "gpt2":  # the tiny byte vocabulary: no merges, but the key llama.cpp needs
        assert fields["tokenizer.ggml.pre"] == "gpt-2" and fields["tokenizer.ggml.merges"] == []
    else:
        assert fields["tokenizer.ggml.pre"] == "default" and "tokenizer.ggml.merges" not in fields  # as llama.cpp's
    assert [reader.split(" ")[0] for reader in record["checked_by"]] == ["transformers", "llama.cpp"]


def test_a_tokenizer_llamacpp_does_not_know_is_refused(tmp_path):
    tokenizer = trained_byte_level_bpe()
    source = tmp_path / "model"
    model = peftkit.load_model("tiny-llama")[0]
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(source)
    tokenizer.save_pretrained(source)
    with pytest.raises(ModelError, match=r"llama.cpp does not recognise the pre-tokenizer of tokenizer .*model' "
                                         r"\(its check hash [0-9a-f]{16}\.\.\. is none of the 95 known to llama.cpp "
                                         r"0c1e57098 .*set \"gguf_tokenizer_pre\" to that name") as refused:
        export(str(source), out=tmp_path / "m.gguf")
    assert "\n" not in str(refused.value) and not list(tmp_path.glob("*.gguf*"))
    tokenizer.init_kwargs[GGUF_PRE_KEY] = "gpt-2"  # as a model cached from a GGUF file carries it: kept
    assert llamacpp_names.pre_tokenizer(tokenizer, True) == "gpt-2"
    tokenizer.init_kwargs[GGUF_PRE_KEY] = "gpt2"  # a value llama.cpp does not accept is not kept
    with pytest.raises(ModelError, match="does not recognise"):
        llamacpp_names.pre_tokenizer(tokenizer, True)


def test_the_cache_keeps_the_source_files_name(tmp_path, monkeypatch):
    """A registry model cached from a GGUF file carries the file's tokenizer.ggml.pre into its
    tokenizer config, and from there into merged directories and exports."""
    export("tiny-qwen2", outtype="f32", out=tmp_path / "source.gguf")
    monkeypatch.setattr(fetch, "assemble", lambda entry, work: tmp_path / "source.gguf")
    entry = fetch.RegistryEntry(name="x", hub_id="x/x", description="", licence="", kind="gguf")
    fetch._build_cache(entry, tmp_path / "cache")
    assert json.loads((tmp_path / "cache" / "tokenizer_config.json").read_text())[GGUF_PRE_KEY] == "gpt-2"
    assert AutoTokenizer.from_pretrained(tmp_path / "cache").init_kwargs[GGUF_PRE_KEY] == "gpt-2"


def test_a_llamacpp_check_without_llamacpp_is_one_line(tmp_path, monkeypatch):
    from peftkit import gguf_llamacpp

    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed
    monkeypatch.setattr(gguf_llamacpp, "cache_dir", lambda: tmp_path / "cache")  # and not built
    gguf_llamacpp.load_binding.cache_clear()
    with pytest.raises(ConfigError, match=r"llama.cpp check needs the llama_cpp module: run `python "
                                          r"bench/llamacpp.py --build` once") as missing:
        export("tiny-llama", out=tmp_path / "m.gguf", llamacpp=True)
    gguf_llamacpp.load_binding.cache_clear()
    assert "\n" not in str(missing.value) and not (tmp_path / "m.gguf").exists()


def test_a_binding_without_its_library_is_one_line(tmp_path, monkeypatch):
    from peftkit import gguf_llamacpp

    fake = tmp_path / "site" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise FileNotFoundError(\"Shared library with base name 'llama' not found\")\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    gguf_llamacpp.load_binding.cache_clear()
    with pytest.raises(ConfigError, match=r"needs the llama_cpp module: .* \(Shared library with base name 'llama' "
                                          r"not found\)$"):
        gguf_llamacpp.load_binding()
    gguf_llamacpp.load_binding.cache_clear()
