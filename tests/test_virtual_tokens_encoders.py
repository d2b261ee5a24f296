"""Prefix-tuning and prompt tuning beyond decoders, equal to peft 0.21: T5 (seq2seq), BERT with
classification heads (seq-cls, token-cls) and a decoder classifier (Qwen2 seq-cls).

For each: logits through each other's saved adapters (ours -> peft, peft -> ours) on a padded
batch, trainable counts, saved config and keys, and 20 AdamW steps with equal loss curves. peft's
own behaviours that peftkit does not copy are pinned here too: its prefix-tuning cannot run on any
classifier under transformers 5 (ours is checked against the attention equation instead), and its
token-cls prompt tuning cannot compute a loss.
"""

import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file

import peftkit
from peftkit.errors import AdapterError, ConfigError
from peftkit.models.tasks import PEFT_TASK_TYPES
from tests.conftest import VOCAB, token_batch

TOL = 1e-5
N = 4  # virtual tokens
L = 12  # real tokens
FAMILIES = {"t5": ("tiny-t5", "seq2seq"), "bert-seq-cls": ("tiny-bert", "seq-cls"),
            "bert-token-cls": ("tiny-bert", "token-cls"), "qwen2-seq-cls": ("tiny-qwen2", "seq-cls")}
CASES = [("t5", "prefix"), ("t5", "prompt"), ("bert-seq-cls", "prompt"), ("bert-token-cls", "prompt"),
         ("qwen2-seq-cls", "prompt")]
PEFT_CONFIGS = {"prefix": PrefixTuningConfig, "prompt": PromptTuningConfig}


def load(family: str) -> torch.nn.Module:
    name, task = FAMILIES[family]
    labels = {"num_labels": 2} if task.endswith("cls") else {}
    return peftkit.load_model(name, task=task, dtype="fp32", device="cpu", **labels)[0]


def task_type(family: str) -> str:
    return PEFT_TASK_TYPES[FAMILIES[family][1]]


def inputs(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    x = token_batch(VOCAB, batch=2, length=L, seed=seed)
    mask = torch.ones_like(x)
    if family != "qwen2-seq-cls":  # peft pools a decoder classifier's last position, pad or not, given embeddings
        mask[1, -3:] = 0
    batch = {"input_ids": x, "attention_mask": mask}
    if family == "t5":
        batch["decoder_input_ids"] = x[:, :7]
    return batch


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], family: str) -> torch.Tensor:
    with torch.no_grad():
        out = model(**batch).logits
    return out[:, -L:] if family == "bert-token-cls" else out  # peft keeps the virtual tokens' logits


def randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(std=0.5, generator=torch.Generator().manual_seed(seed))
    return model


def peft_model(family: str, method: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return get_peft_model(load(family), PEFT_CONFIGS[method](task_type=task_type(family), num_virtual_tokens=N))


@pytest.mark.parametrize(("family", "method"), CASES)
def test_both_ways_equal_peft(family, method, tmp_path):
    batch = inputs(family)
    model = randomize(peftkit.apply_adapter(load(family), method, num_virtual_tokens=N, init="random"), 1).eval()
    directory = peftkit.save_adapter(model, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(load(family), directory).eval()
    assert (logits(model, batch, family) - logits(theirs, batch, family)).abs().max() <= TOL

    reference = randomize(peft_model(family, method), 2).eval()
    reference.save_pretrained(tmp_path / "theirs")
    loaded = peftkit.load_adapter(load(family), tmp_path / "theirs").eval()
    expected = logits(reference, batch, family)
    assert (logits(loaded, batch, family) - expected).abs().max() <= TOL
    assert (logits(load(family).eval(), batch, family) - expected).abs().max() > 0.1  # the adapter matters
    assert peftkit.trainable_parameters(loaded) == reference.get_nb_trainable_parameters()

    ours_config = json.loads((directory / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    for key in ("peft_type", "task_type", "num_transformer_submodules", "num_layers", "token_dim"):
        assert ours_config[key] == peft_config[key]
    saved, peft_saved = (load_file(d / "adapter_model.safetensors") for d in (directory, tmp_path / "theirs"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in peft_saved.items()}


def train_losses(model: torch.nn.Module, family: str, reference: bool = False, steps: int = 20) -> list[float]:
    """Losses of 20 AdamW steps; a token classifier's loss for peft from its real tokens' logits."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    torch.manual_seed(0)  # the base models' own dropout draws the same masks on both sides
    model.train()
    losses = []
    for _ in range(steps):
        batch = inputs(family)  # one batch: virtual tokens can memorise it
        if family == "t5":
            batch["labels"] = batch.pop("decoder_input_ids").contiguous()
        elif family == "bert-seq-cls":
            batch["labels"] = torch.tensor([0, 1])
        if family == "bert-token-cls":
            labels = batch["input_ids"] % 2
            if reference:
                out = model(**batch).logits[:, -L:]
                loss = torch.nn.functional.cross_entropy(out.reshape(-1, 2), labels.reshape(-1))
            else:
                loss = model(**batch, labels=labels).loss
        else:
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(("family", "method"), CASES[:4])
def test_loss_curves_equal_peft(family, method, tmp_path):
    reference = peft_model(family, method)  # peft loads prompt learning for inference only: ours loads its start
    reference.save_pretrained(tmp_path / "init")
    model = peftkit.load_adapter(load(family), tmp_path / "init")
    ours, theirs = train_losses(model, family), train_losses(reference, family, reference=True)
    assert ours[-1] < ours[0] - 0.01
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= 1e-4


def test_peft_token_cls_prompt_tuning_cannot_compute_its_loss():
    """peft 0.21 prepends the prompt but not -100 labels, so the head's loss sees n + L logits and L labels."""
    batch = inputs("bert-token-cls")
    labels = batch["input_ids"] % 2
    with pytest.raises(ValueError, match="Expected input batch_size"):
        peft_model("bert-token-cls", "prompt")(**batch, labels=labels)
    model = peftkit.apply_adapter(load("bert-token-cls"), "prompt", num_virtual_tokens=N)
    out = model(**batch, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 2), labels.reshape(-1))
    assert out.logits.shape == (2, L, 2) and torch.allclose(out.loss, expected)


@pytest.mark.parametrize("family", ["bert-seq-cls", "bert-token-cls"])
def test_prefix_on_bert_follows_the_attention_equation(family):
    """peft 0.21 cannot run prefix-tuning on a classifier (pinned below), so ours is checked against
    the equation itself, layer by layer: softmax(q [P_k; k]^T / sqrt(d) + mask) [P_v; v], with the
    padded keys masked and the prefix always visible; real tokens at positions n, n + 1, ... (as
    BERT's own cache offsets them, and P-tuning v2 ran it)."""
    model = randomize(peftkit.apply_adapter(load(family), "prefix", num_virtual_tokens=N, init="random"), 1)
    batch = inputs(family)
    seen = []
    hooks = [layer.attention.self.register_forward_hook(lambda m, a, kw, out: seen.append((a[0], out[0])),
                                                        with_kwargs=True) for layer in model.bert.encoder.layer]
    embeddings = model.bert.embeddings
    expected_embeddings = embeddings.LayerNorm(embeddings.word_embeddings(batch["input_ids"])
                                               + embeddings.position_embeddings.weight[N:N + L]
                                               + embeddings.token_type_embeddings.weight[0])
    hooks.append(embeddings.register_forward_hook(lambda m, a, kw, out: seen.append(("embeddings", out)),
                                                  with_kwargs=True))
    with torch.no_grad():
        model(**batch)
        for hook in hooks:
            hook.remove()
        real = batch["attention_mask"].bool()  # padded positions are never attended to
        assert seen[0][0] == "embeddings" and (seen[0][1] - expected_embeddings)[real].abs().max() <= TOL
        prefix = model.peftkit_prefix.key_values(2, torch.float32)
        visible = torch.cat([torch.ones(2, N), batch["attention_mask"].float()], dim=1)  # (batch, n + L)
        for layer, ((hidden, output), (p_key, p_value)) in enumerate(zip(seen[1:], prefix)):
            attention = model.bert.encoder.layer[layer].attention.self
            heads = lambda t: t.view(2, L, -1, attention.attention_head_size).transpose(1, 2)  # noqa: E731
            keys = torch.cat([p_key, heads(attention.key(hidden))], dim=2)
            values = torch.cat([p_value, heads(attention.value(hidden))], dim=2)
            scores = heads(attention.query(hidden)) @ keys.transpose(-1, -2) * attention.attention_head_size ** -0.5
            scores = scores.masked_fill(visible[:, None, None, :] == 0, float("-inf"))
            context = (scores.softmax(-1) @ values).transpose(1, 2).reshape(2, L, -1)
            assert (output - context).abs().max() <= TOL
    assert len(seen) == 1 + model.config.num_hidden_layers


@pytest.mark.parametrize("family", ["bert-seq-cls", "bert-token-cls", "qwen2-seq-cls"])
def test_prefix_on_classifiers_saves_what_peft_reads_though_peft_cannot_run_it(family, tmp_path):
    reference = peft_model(family, "prefix")
    with pytest.raises(ValueError, match="does not support past key values"):
        reference(**inputs(family))  # transformers 5 takes the cache as `cache`; peft looks for past_key_values
    model = randomize(peftkit.apply_adapter(load(family), "prefix", num_virtual_tokens=N, init="random"), 2)
    assert peftkit.trainable_parameters(model) == reference.get_nb_trainable_parameters()
    ours = peftkit.save_adapter(model, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(load(family), ours)  # peft reads our file: the same prefix table
    table = theirs.prompt_encoder["default"].embedding.weight
    assert torch.equal(table, model.peftkit_prefix.embedding.weight)
    reference.save_pretrained(tmp_path / "theirs")  # and we read peft's, and run it
    loaded = peftkit.load_adapter(load(family), tmp_path / "theirs")
    assert torch.equal(loaded.peftkit_prefix.embedding.weight, reference.prompt_encoder["default"].embedding.weight)
    assert logits(loaded, inputs(family), family).isfinite().all()


def test_prefix_trains_a_bert_classifier():
    model = peftkit.apply_adapter(load("bert-seq-cls"), "prefix", num_virtual_tokens=N, init="random")
    batch, labels = inputs("bert-seq-cls"), torch.tensor([0, 1])
    model.train()
    model(**batch, labels=labels).loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {"peftkit_prefix.embedding.weight", "classifier.weight", "classifier.bias"}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


def test_t5_virtual_tokens_follow_peft_layout():
    """peft's T5 prefix reaches the decoder's self-attention only, every decoder layer reading the
    table's layer 2i mod L (here layer 0); its prompt reads the first n of its 2n rows."""
    batch = {**inputs("t5"), "labels": inputs("t5")["decoder_input_ids"].contiguous()}
    with torch.no_grad():
        base = load("t5").eval()(**batch).encoder_last_hidden_state
    for method in ("prefix", "prompt"):
        for model in (peftkit.apply_adapter(load("t5"), method, num_virtual_tokens=N).eval(),
                      peft_model("t5", method).eval()):
            out = model(**batch)
            out.loss.backward()
            grad = next(p for p in model.parameters() if p.requires_grad).grad
            if method == "prefix":
                assert torch.equal(out.encoder_last_hidden_state, base)
                used = grad.view(N, 2, 2, -1).abs().sum((0, 3)) > 0  # (table layer, key/value)
                assert used.tolist() == [[True, True], [False, False]]
            else:
                assert grad.shape == (2 * N, 64) and (grad[:N].abs().sum(1) > 0).all() and not grad[N:].any()


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_t5_generate_keeps_the_virtual_tokens(method, tmp_path):
    """Greedy steps score as the peft forward over the generated decoder sequence (prompt tuning
    hooks the encoder, which generate calls on its own)."""
    model = randomize(peftkit.apply_adapter(load("t5"), method, num_virtual_tokens=N), 1).eval()
    reference = PeftModel.from_pretrained(load("t5"), peftkit.save_adapter(model, tmp_path / "a"))
    batch = {k: v for k, v in inputs("t5").items() if k != "decoder_input_ids"}
    out = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    expected = logits(reference.eval(), {**batch, "decoder_input_ids": out.sequences[:, :-1]}, "t5")
    assert (torch.stack(out.logits, dim=1) - expected).abs().max() <= 1e-4


def test_unload_removes_the_encoder_hook_too():
    model = peftkit.apply_adapter(load("t5"), "prompt", num_virtual_tokens=N)
    peftkit.protocol.METHODS["prompt"].unload(model)
    assert not model.encoder._forward_pre_hooks and not model._forward_pre_hooks and not model._forward_hooks
    batch = inputs("t5")
    assert torch.equal(logits(model.eval(), batch, "t5"), logits(load("t5").eval(), batch, "t5"))


def test_encoder_decoder_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="init: tokens is for decoders"):
        peftkit.apply_adapter(load("t5"), "prefix", num_virtual_tokens=N, init="tokens")
    peftkit.save_adapter(peftkit.apply_adapter(load("t5"), "prompt", num_virtual_tokens=N), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(path.read_text().replace('"num_transformer_submodules": 2', '"num_transformer_submodules": 1'))
    with pytest.raises(AdapterError, match="num_transformer_submodules=1 for task_type 'SEQ_2_SEQ_LM'"):
        peftkit.load_adapter(load("t5"), tmp_path / "a")
