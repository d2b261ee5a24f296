"""llama.cpp itself loads peftkit's GGUF exports and gives transformers' tokens, logits and greedy
continuations. Outside the default run (`pytest -m llamacpp`): the first run downloads the
llama-cpp-python sdist and builds its llama.cpp into the peftkit cache (`bench/llamacpp_build.py`,
minutes); `bench/llamacpp.py` measures every model, adapter and outtype."""

import pytest

import peftkit
from bench.llamacpp_build import binding, extract_names
from peftkit import gguf_llamacpp, llamacpp_names
from peftkit.errors import ModelError
from peftkit.export import export
from tests.test_export import gemma3_exportable, saved_adapter

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module", autouse=True)
def llama_cpp():
    return binding()


def test_the_names_table_is_llamacpps_source():
    """`peftkit/llamacpp_names.json` is what llama.cpp's source says today (else: --update-names)."""
    assert extract_names() == llamacpp_names.names()


def assert_matches(record, bound, exact=True):
    """Token ids equal; logits within `bound`. `exact`: every top-1 token and greedy continuation
    equal too; else they may differ only where the model's best two logits are within rounding."""
    llama = record["llamacpp"]
    assert llama["loads"] and llama["prompts"] == 10 and llama["token_ids_equal"] == "10/10", llama
    assert llama["max_logit_diff"] <= bound, llama
    if exact:
        assert llama["top1_agreement"] == 1.0 and llama["greedy_equal"] == "10/10", llama
    else:
        assert llama["top1_agreement"] >= 0.99 and llama["top1_flip_margin"] <= 2 * llama["max_logit_diff"], llama
        assert int(llama["greedy_equal"].split("/")[0]) >= 8, llama
        assert llama["greedy_split_margin"] <= 2 * llama["max_logit_diff"], llama
    assert record["checked_by"][-1].startswith("llama.cpp (llama-cpp-python 0.3.36)")


@pytest.mark.parametrize("outtype, bound", [("f32", 5e-3), ("f16", 1e-2)])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3"])
def test_tiny_exports_load_and_match(name, outtype, bound, tmp_path):
    """A merged LoRA on each tiny family. The random tiny models' logits are nearly tied, so at f16
    a top-1 token may differ where the best two are within rounding (measured: 1 of 1,055 positions
    on tiny-gemma3, best two 0.0003 apart, max logit diff 0.002)."""
    source = gemma3_exportable(tmp_path / "model") if name == "tiny-gemma3" else name
    adapter = saved_adapter(tmp_path / "adapter", source)
    assert_matches(export(adapter, outtype=outtype, out=tmp_path / "m.gguf", llamacpp=True), bound, outtype == "f32")


@pytest.mark.slow
def test_the_default_model_loads_and_matches(smol_dir, tmp_path):
    """The issue's regression: llama.cpp refused SmolLM2's export ("unknown pre-tokenizer type: 'gpt2'").
    At f16 one of ten continuations parts at step 18, where the model's best two logits are 0.005
    apart (30.892 and 30.886) and f16 moves logits by up to 0.09."""
    record = export("smollm2-135m", outtype="f16", out=tmp_path / "smol.gguf", llamacpp=True)
    assert_matches(record, 0.25, exact=False)
    assert record["llamacpp"]["top1_agreement"] == 1.0


def test_a_file_llamacpp_refuses_is_not_written(tmp_path, monkeypatch):
    """Were a name to slip past the table, llama.cpp's own refusal stops the export, with its reason."""
    monkeypatch.setattr("peftkit.gguf_tokenizer.pre_tokenizer", lambda *args: "gpt2")
    monkeypatch.setattr(llamacpp_names, "file_problems", lambda path: [])
    with pytest.raises(ModelError, match=r"llama.cpp refuses the exported file \(.*unknown pre-tokenizer type: "
                                         r"'gpt2'\): nothing was written"):
        export("tiny-llama", out=tmp_path / "m.gguf", llamacpp=True)
    assert list(tmp_path.iterdir()) == []


def test_logits_and_tokens_are_compared_for_real(tmp_path):
    """The check is not vacuous: a file whose weights differ from the model is caught."""
    export("tiny-llama", outtype="f32", out=tmp_path / "m.gguf")
    other, tokenizer = peftkit.load_model("tiny-qwen2")  # the same tokenizer, other weights
    measured = gguf_llamacpp.check(peftkit.load_model("tiny-llama")[0], tokenizer, tmp_path / "m.gguf")
    assert measured["token_ids_equal"] == "10/10" and measured["max_logit_diff"] <= 1e-3  # measured 1.4e-4
    assert gguf_llamacpp.check(other, tokenizer, tmp_path / "m.gguf")["max_logit_diff"] > 0.01
