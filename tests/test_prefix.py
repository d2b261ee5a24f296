"""Prefix-tuning and prompt tuning: invariants, padding, generation, errors, and parity with peft
(logits through each other's saved adapters, parameter counts, 20-step loss curves).

peft 0.21's own `generate` ignores a prefix under transformers 5.x (it passes `past_key_values`
next to generate's `cache`, and the model keeps `cache`), so generations are checked against
the reference semantics: peft's forward on the whole sequence, token by token.
"""

import copy

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import StaticCache

import peftkit
from peftkit.errors import AdapterError, ConfigError
from peftkit.methods.prefix import PrefixEncoder
from peftkit.methods.prompt import PromptEmbedding
from tests.conftest import VOCAB, token_batch

TOL = 1e-5
P = 6  # virtual tokens in these tests
PEFT_CONFIGS = {
    "prefix": (PrefixTuningConfig, {}),
    "prefix-mlp": (PrefixTuningConfig, {"prefix_projection": True, "encoder_hidden_size": 24}),
    "prompt": (PromptTuningConfig, {}),
}
OURS = {"prefix": ("prefix", {}), "prefix-mlp": ("prefix", {"prefix_projection": True, "encoder_hidden_size": 24}),
        "prompt": ("prompt", {"init": "random"})}


def load(name: str = "tiny-llama") -> torch.nn.Module:
    return peftkit.load_model(name, dtype="fp32", device="cpu")[0]


def adapter_of(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, PrefixEncoder.attribute, None) or getattr(model, PromptEmbedding.attribute)


def ours(variant: str, name: str = "tiny-llama", std: float | None = None, **kw) -> torch.nn.Module:
    method, variant_kw = OURS[variant]
    model = peftkit.apply_adapter(load(name), method, num_virtual_tokens=P, **{**variant_kw, **kw})
    if std is not None:
        with torch.no_grad():
            for p in adapter_of(model).parameters():
                p.normal_(std=std, generator=torch.Generator().manual_seed(1))
    return model


def theirs(variant: str, name: str = "tiny-llama", std: float | None = None) -> torch.nn.Module:
    config_class, kw = PEFT_CONFIGS[variant]
    torch.manual_seed(0)
    model = get_peft_model(load(name), config_class(task_type="CAUSAL_LM", num_virtual_tokens=P, **kw))
    if std is not None:
        with torch.no_grad():
            for p in model.prompt_encoder.parameters():
                p.normal_(std=std, generator=torch.Generator().manual_seed(1))
    return model.eval()


def logits(model: torch.nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=x, **kw).logits
    return out[:, -x.shape[1]:]  # peft's prompt tuning also returns the virtual tokens' logits


def check_generation(model, reference, x, mask=None, new_tokens=6, tol=1e-4, **kw) -> torch.Tensor:
    """generate's per-step logits equal the reference's forward over the generated sequence.

    `tol` allows for cached decoding's different matmul shapes (smollm2's own generate differs
    from its forward by about 1e-4)."""
    mask = torch.ones_like(x) if mask is None else mask
    out = model.generate(x, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=2, **kw)
    full_mask = torch.cat([mask, torch.ones(len(x), new_tokens, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)  # explicit: peft counts left pads otherwise
    expected = logits(reference, out.sequences, attention_mask=full_mask, position_ids=positions)
    expected = expected[:, x.shape[1] - 1:-1]
    assert (torch.stack(out.logits, dim=1) - expected).abs().max().item() <= tol
    if not kw.get("do_sample"):
        assert torch.equal(out.sequences[:, x.shape[1]:], expected.argmax(-1))
    return out.sequences


# --- invariants --------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", OURS)
def test_apply_freezes_base_and_keeps_the_object(variant):
    model = load()
    before = {n: p.clone() for n, p in model.named_parameters()}
    method, kw = OURS[variant]
    assert peftkit.apply_adapter(model, method, num_virtual_tokens=P, **kw) is model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("peftkit_prefix.", "peftkit_prompt.")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    x = token_batch(VOCAB)
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
    opt.step()
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("variant", OURS)
def test_unload_restores_the_base_model(variant):
    model = ours(variant, std=1.0)
    x = token_batch(VOCAB)
    assert (logits(model, x) - logits(load(), x)).abs().max() > 1e-3  # the adapter matters
    peftkit.protocol.METHODS[OURS[variant][0]].unload(model)
    assert (logits(model, x) - logits(load(), x)).abs().max() <= TOL
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert not hasattr(model, "peftkit_prefix") and not hasattr(model, "peftkit_prompt")


@pytest.mark.parametrize("variant", ["prefix", "prompt"])
def test_deep_copy_is_independent(variant):
    model = ours(variant, std=1.0)
    x = token_batch(VOCAB)
    twin = copy.deepcopy(model)
    assert (logits(twin, x) - logits(model, x)).abs().max() <= TOL
    peftkit.protocol.METHODS[variant].unload(twin)
    assert (logits(twin, x) - logits(load(), x)).abs().max() <= TOL
    assert (logits(model, x) - logits(load(), x)).abs().max() > 1e-3  # the original keeps its adapter


def test_tokens_init_reads_like_the_text_first(tiny):
    model, tokenizer = tiny
    peftkit.apply_adapter(model, "prefix-init", num_virtual_tokens=P, init_text="Review:")
    ids = torch.tensor((tokenizer("Review:")["input_ids"] * P)[:P])
    x = token_batch(VOCAB)
    expected = logits(load(), torch.cat([ids.expand(len(x), -1), x], dim=1))[:, P:]
    assert (logits(model, x) - expected).abs().max() <= TOL
    mlp = peftkit.apply_adapter(load(), "prefix-init", num_virtual_tokens=P, init_text="Review:",
                                prefix_projection=True)
    assert (logits(mlp, x) - expected).abs().max() <= 1e-4  # the MLP's last layer is solved to match


def test_prompt_text_init_equals_peft(tiny, tmp_path):
    model, tokenizer = tiny
    tokenizer.save_pretrained(tmp_path / "tok")
    peftkit.apply_adapter(model, "prompt", num_virtual_tokens=P, init_text="great movie")
    peft_model = get_peft_model(load(), PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prompt_tuning_init="TEXT", prompt_tuning_init_text="great movie",
        tokenizer_name_or_path=str(tmp_path / "tok")))
    assert torch.equal(model.peftkit_prompt.embedding.weight, peft_model.prompt_encoder.default.embedding.weight)


# --- padding, labels, generation --------------------------------------------------------------

@pytest.mark.parametrize("variant", OURS)
def test_padding_left_and_right_equals_unpadded(variant):
    model = ours(variant, std=1.0)
    long, short = token_batch(VOCAB, batch=1, length=10, seed=1), token_batch(VOCAB, batch=1, length=6, seed=2)
    alone = logits(model, short)
    pad = torch.full((1, 4), 2)
    for batch, mask, rows in [
        (torch.cat([long, torch.cat([pad, short], 1)]), torch.tensor([[1] * 10, [0] * 4 + [1] * 6]), slice(4, None)),
        (torch.cat([long, torch.cat([short, pad], 1)]), torch.tensor([[1] * 10, [1] * 6 + [0] * 4]), slice(0, 6)),
    ]:
        out = logits(model, batch, attention_mask=mask)
        assert (out[1:, rows] - alone).abs().max() <= 1e-4
        assert (out[:1] - logits(model, long)).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", OURS)
def test_labels_aligned(variant):
    model = ours(variant, std=1.0)
    x = token_batch(VOCAB)
    out = model(input_ids=x, labels=x)
    assert out.logits.shape == (*x.shape, VOCAB)  # the real tokens' logits only, whatever the method
    if variant == "prompt":  # as in peft, the last virtual token also predicts the first real one
        embeds = torch.cat([model.peftkit_prompt.embedding.weight.expand(len(x), -1, -1),
                            model.get_input_embeddings()(x)], dim=1)
        labels = torch.cat([torch.full((len(x), P), -100), x], dim=1)
        peftkit.protocol.METHODS["prompt"].unload(model)
        expected = model(inputs_embeds=embeds, labels=labels).loss
    else:
        expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    assert abs(out.loss.item() - expected.item()) <= TOL
    if variant != "prompt":
        assert torch.equal(model(input_ids=x, labels=x, return_dict=False)[1], out.logits)


def test_prompt_returns_tuples_on_request():
    model = ours("prompt", std=1.0)
    x = token_batch(VOCAB)
    loss, out_logits = model(x, None, None, None, None, x, return_dict=False)[:2]
    assert out_logits.shape == (*x.shape, VOCAB) and torch.equal(loss, model(input_ids=x, labels=x).loss)


@pytest.mark.parametrize("variant", OURS)
def test_generate_greedy_and_sampling_follow_the_forward(variant):
    model = ours(variant, std=10.0)
    x = token_batch(VOCAB, batch=2, length=7)
    check_generation(model, model, x, new_tokens=8)
    torch.manual_seed(0)
    check_generation(model, model, x, new_tokens=8, do_sample=True, top_k=50)
    left = torch.cat([torch.full((1, 3), 2), x[1:, :4]], dim=1)
    batch, mask = torch.cat([x[:1], left]), torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    padded = check_generation(model, model, batch, mask, new_tokens=8)
    alone = model.generate(x[1:, :4], attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=8,
                           do_sample=False, pad_token_id=2)
    assert torch.equal(padded[1, 7:], alone[0, 4:])


# --- parity with peft -----------------------------------------------------------------------------

@pytest.mark.parametrize("variant", OURS)
def test_trainable_counts_equal_peft(variant):
    assert peftkit.trainable_parameters(ours(variant)) == theirs(variant).get_nb_trainable_parameters()


def peft_to_ours(variant, tmp_path, name="tiny-llama", std=None):
    peft_model = theirs(variant, name, std)
    peft_model.save_pretrained(tmp_path / "theirs")
    model = peftkit.load_adapter(load(name), tmp_path / "theirs")
    x = token_batch(model.config.vocab_size, batch=2, length=9)
    assert (logits(model, x) - logits(peft_model, x)).abs().max().item() <= TOL
    return model, peft_model, x


def ours_to_peft(variant, tmp_path, name="tiny-llama", std=None, **kw):
    model = ours(variant, name, std, **kw)
    directory = peftkit.save_adapter(model, tmp_path / "ours")
    peft_model = PeftModel.from_pretrained(load(name), directory)
    x = token_batch(model.config.vocab_size, batch=2, length=9)
    assert (logits(model, x) - logits(peft_model, x)).abs().max().item() <= TOL
    return model, peft_model, x


@pytest.mark.parametrize("variant", OURS)
def test_peft_loads_in_ours_tiny(variant, tmp_path):
    model, peft_model, x = peft_to_ours(variant, tmp_path, std=10.0 if variant != "prompt" else None)
    check_generation(model, peft_model, x)


@pytest.mark.parametrize("variant", OURS)
def test_ours_loads_in_peft_tiny(variant, tmp_path):
    model, peft_model, x = ours_to_peft(variant, tmp_path, std=10.0 if variant != "prompt" else None)
    check_generation(model, peft_model, x)
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    width = 2 * 2 * 32 if variant != "prompt" else 64  # layers * (key, value) * kv heads * head dim
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"prompt_embeddings": (P, width)}


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["prefix", "prompt"])
def test_interop_smollm2(smol_dir, variant, tmp_path):
    model, peft_model, x = peft_to_ours(variant, tmp_path / "a", "smollm2-135m")
    check_generation(model, peft_model, x, new_tokens=4, tol=2e-3)
    model, peft_model, x = ours_to_peft(variant, tmp_path / "b", "smollm2-135m", init="tokens")
    check_generation(model, peft_model, x, new_tokens=4, tol=2e-3)


def test_saved_configs_match_peft_schema(tmp_path):
    directory = peftkit.save_adapter(ours("prefix-mlp"), tmp_path / "prefix")
    config = PrefixTuningConfig.from_pretrained(directory)
    assert (config.num_virtual_tokens, config.token_dim, config.num_attention_heads, config.num_layers,
            config.prefix_projection, config.encoder_hidden_size) == (P, 32, 2, 2, True, 24)
    prompt = ours("prompt", init="tokens", init_text="great movie")
    config = PromptTuningConfig.from_pretrained(peftkit.save_adapter(prompt, tmp_path / "prompt"))
    assert (config.token_dim, config.prompt_tuning_init, config.prompt_tuning_init_text) == (64, "TEXT", "great movie")


def train_losses(model, steps=20, lr=5e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 18:] = 0  # right padding on one row
    model.train()
    losses = []
    for step in range(steps):
        x = token_batch(model.config.vocab_size, batch=2, length=24, seed=0)  # one batch: a prefix can memorise it
        loss = model(input_ids=x, attention_mask=mask, labels=x.masked_fill(mask == 0, -100)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def loss_curves(variant: str, name: str = "tiny-llama", lr: float = 5e-2) -> tuple[list[float], list[float]]:
    peft_model = theirs(variant, name)
    model = ours(variant, name)
    adapter_of(model).load_state_dict(peft_model.prompt_encoder.default.state_dict())  # the same start
    return train_losses(model, lr=lr), train_losses(peft_model, lr=lr)


@pytest.mark.parametrize("variant", OURS)
def test_loss_curves_equal_peft_tiny(variant):
    ours_losses, peft_losses = loss_curves(variant)
    assert ours_losses[-1] < ours_losses[0] - 0.05  # it learns
    assert max(abs(a - b) for a, b in zip(ours_losses, peft_losses)) <= 1e-4


@pytest.mark.slow
def test_loss_curves_equal_peft_smollm2(smol_dir):
    ours_losses, peft_losses = loss_curves("prefix-mlp", "smollm2-135m", lr=1e-2)  # the MLP: the touchiest
    assert ours_losses[-1] < ours_losses[0]
    assert max(abs(a - b) for a, b in zip(ours_losses, peft_losses)) <= 1e-4


# --- errors ---------------------------------------------------------------------------------------

def one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_num_virtual_tokens(method, n):
    with pytest.raises(ConfigError) as exc:
        peftkit.apply_adapter(load(), method, num_virtual_tokens=n)
    assert "num_virtual_tokens must be a positive integer" in one_line(exc)


def test_bad_init_options():
    with pytest.raises(ConfigError, match="init must be one of"):
        peftkit.apply_adapter(load(), "prefix", init="zeros")
    with pytest.raises(ConfigError, match="set init: tokens"):
        peftkit.apply_adapter(load(), "prompt", init="random", init_text="hello")
    with pytest.raises(ConfigError, match="encoder_hidden_size >= num_virtual_tokens"):
        peftkit.apply_adapter(load(), "prefix-init", prefix_projection=True, encoder_hidden_size=8)
    model = load()
    model.name_or_path = "/nowhere/model"
    with pytest.raises(ConfigError) as exc:
        peftkit.apply_adapter(model, "prompt", init_text="hello")
    assert "tokenizer" in one_line(exc)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_merge_says_what_to_ship(method):
    model = peftkit.apply_adapter(load(), method)
    with pytest.raises(AdapterError) as exc:
        peftkit.merge_adapter(model, unload=True)
    message = one_line(exc)
    assert "cannot be merged" in message and "load_adapter" in message and "PeftModel.from_pretrained" in message
    assert model.peftkit_config is not None and hasattr(model, adapter_of(model).attribute)  # still adapted


def test_prefix_refuses_what_would_drop_it():
    model = peftkit.apply_adapter(load(), "prefix")
    x = token_batch(VOCAB)
    with pytest.raises(AdapterError, match="DynamicCache"):
        model(input_ids=x, cache=StaticCache(config=model.config, max_cache_len=64))
    with pytest.raises(AdapterError, match="2D attention mask"):
        model(input_ids=x, attention_mask=torch.ones(2, 1, 16, 16))
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(AdapterError, match="gradient checkpointing"):
        model(input_ids=x, labels=x)


def test_adapter_for_another_model_is_refused_and_removed(tmp_path):
    directory = peftkit.save_adapter(ours("prefix"), tmp_path / "a")
    other = peftkit.load_model("tiny-llama")[0]
    other.config.num_hidden_layers = 1
    other.model.layers = other.model.layers[:1]
    with pytest.raises(AdapterError) as exc:
        peftkit.load_adapter(other, directory)
    assert "prompt_embeddings" in one_line(exc) and "(6, 128)" in one_line(exc) and "(6, 64)" in one_line(exc)
    assert other.peftkit_config is None and not other._forward_pre_hooks
    assert all(p.requires_grad for p in other.parameters())


def test_encoder_decoder_adapter_is_refused(tmp_path):
    peftkit.save_adapter(ours("prefix"), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(path.read_text().replace('"num_transformer_submodules": 1', '"num_transformer_submodules": 2'))
    with pytest.raises(AdapterError, match="encoder-decoder"):
        peftkit.load_adapter(load(), tmp_path / "a")
