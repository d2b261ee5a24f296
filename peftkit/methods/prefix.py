"""Prefix-tuning (Li and Liang, 2021), from scratch.

Prefix-tuning trains `num_virtual_tokens` key/value pairs for every attention layer; every real
token attends to them as if a (virtual) text preceded it. The prefix enters the frozen model as
the first entries of transformers' key/value cache, built on the first forward of a sequence:

    prefix: (n, layers * 2 * kv_heads * head_dim)     peft's layout, saved as `prompt_embeddings`
      -> per layer: key, value (batch, kv_heads, n, head_dim)   -> the cache, then the input

Optionally (section 4.3 of the paper) the prefix is reparameterised while training as
MLP(embedding): Embedding(n, kv width) -> Linear -> Tanh -> Linear, peft's `PrefixEncoder`; the
MLP is folded into a plain prefix when saving, so a saved adapter is always plain.

Decoders (causal LMs) and encoder-decoders (T5) take a prefix; on an encoder-decoder it goes,
as in peft 0.21, into the decoder's self-attention only (see `PrefixEncoder`'s Note). Masks,
positions and hooks are shared with prompt tuning, see `peftkit.methods.virtual_tokens`.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from peftkit.errors import AdapterError, ConfigError
from peftkit.models.tasks import task_of_model
from peftkit.methods.virtual_tokens import (VirtualTokens, adapter_dtype, cache_kwarg, check_init, check_prompt_learning_config,
                                    check_virtual_tokens, gradient_checkpointing, init_token_ids,
                                    transformer_submodules)

PREFIX_INITS = ("random", "tokens")


@dataclass
class PrefixConfig:
    """A prefix-tuning adapter, as written in an `adapters/*.yaml` preset."""

    method: ClassVar[str] = "prefix"
    num_virtual_tokens: int = 20  # trained key/value pairs in front of every layer's attention
    prefix_projection: bool = False  # train the prefix through an MLP (folded away when saving)
    encoder_hidden_size: int | None = None  # MLP width (prefix_projection only); None: the key/value width
    init: str = "random"  # random: N(0, 1) as peft; tokens: the model's own keys/values for real tokens
    init_text: str | None = None  # init: tokens starts from this text's keys/values; None: random vocabulary tokens

    def __post_init__(self) -> None:
        check_virtual_tokens(self.num_virtual_tokens)
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection must be true or false, got {self.prefix_projection!r}")
        size = self.encoder_hidden_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ConfigError(f"encoder_hidden_size must be a positive integer or null, got {size!r}")
        check_init(self.init, self.init_text, PREFIX_INITS)


def kv_layout(model: nn.Module) -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of a decoder, worked out as peft does (GQA aware).

    On T5, `num_hidden_layers` is the encoder's layer count and `head_dim` is `d_kv`.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    try:
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    except AttributeError as exc:
        raise AdapterError(f"{type(model).__name__} has no decoder attention layout in its config ({exc}): "
                           f"prefix-tuning needs a transformers causal LM") from None
    return layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


class PrefixEncoder(VirtualTokens):
    """The trained prefix: a plain (n, layers * 2 * kv width) table, or an MLP over n embeddings.

    Parameter names follow peft's `PrefixEncoder` (`embedding.weight`, `transform.0.weight`, ...),
    so weights copy across directly.

    Args:
        num_virtual_tokens: n, the prefix length.
        layers, heads, head_dim: the model's layer count, key/value heads and head dim.
        projection: train through Embedding -> Linear -> Tanh -> Linear (Li and Liang, 4.3).
        encoder_hidden_size: the MLP's hidden width.
        task: the model's task; on `seq2seq` the prefix follows peft's encoder-decoder layout.

    Note: on an encoder-decoder peft 0.21 (`PeftModel.get_prompt`, num_transformer_submodules=2)
    doubles the table along the layers and cuts it into 4 tensors per decoder layer, read as
    (self-attention key, value, cross-attention key, value); it then empties the cross-attention
    cache so that it is rebuilt from the encoder. So decoder layer i attends to the table's layer
    2i mod L (on 2 layers: layer 0 twice), the odd layers of the table are trained by nothing, and
    the encoder and the cross-attention see no prefix. peftkit keeps that layout, so that the two
    load each other's adapters with equal logits.
    """

    attribute = "peftkit_prefix"
    needs_cache = True

    def __init__(self, num_virtual_tokens: int, layers: int, heads: int, head_dim: int, projection: bool = False,
                 encoder_hidden_size: int | None = None, task: str = "causal-lm", *,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__(num_virtual_tokens, task)
        self.layout = (layers, heads, head_dim)
        width = heads * head_dim  # peft's token_dim
        kwargs = {"dtype": dtype, "device": device}
        if projection:
            hidden = encoder_hidden_size or width
            self.embedding = nn.Embedding(num_virtual_tokens, width, **kwargs)
            self.transform = nn.Sequential(nn.Linear(width, hidden, **kwargs), nn.Tanh(),
                                           nn.Linear(hidden, layers * 2 * width, **kwargs))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, layers * 2 * width, **kwargs)
            self.transform = None

    @property
    def adapter_parameter_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.named_parameters())

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable tensors under peft's names: the plain prefix is saved as `prompt_embeddings`."""
        if self.transform is None:
            return {"prompt_embeddings": self.embedding.weight}
        return {f"prompt_encoder.{name}": p for name, p in self.named_parameters()}

    @torch.no_grad()
    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """What peft saves: the prefix with any MLP folded in, under the bare key `prompt_embeddings`."""
        return {"prompt_embeddings": self.prefix()[0].contiguous()}

    def prefix(self, batch: int = 1) -> torch.Tensor:
        """(batch, n, layers * 2 * heads * head_dim); per token: layer 0 key, layer 0 value, layer 1 key, ...

        Note: the MLP runs on the batch-expanded embeddings, the shapes peft uses, so its matmuls
        round alike: from the same start, training curves match peft's bit for bit, where a
        random MLP prefix on a 30-layer model would otherwise amplify 1e-7 differences to 1e-3.
        """
        table = self.embedding.weight.expand(batch, -1, -1)
        return table if self.transform is None else self.transform(table)

    def key_values(self, batch: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (key, value), each (batch, heads, n, head_dim)."""
        layers, heads, head_dim = self.layout
        kv = self.prefix(batch).to(dtype).view(batch, self.num_virtual_tokens, layers, 2, heads, head_dim)
        kv = kv.permute(2, 3, 0, 4, 1, 5)  # (layers, key/value, batch, heads, n, head_dim)
        return [(kv[i, 0], kv[i, 1]) for i in range(layers)]

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Decoders: see `VirtualTokens.prepare`. Encoder-decoders (peft's `PeftModelForSeq2SeqLM`):
        the decoder's mask gains n leading ones and its cache starts with the prefix."""
        if self.task != "seq2seq":
            return super().prepare(model, kwargs)
        decoder = [kwargs[k] for k in ("decoder_input_ids", "decoder_inputs_embeds", "labels")
                   if kwargs.get(k) is not None]
        if not decoder:
            return kwargs  # the model raises its own error
        batch = decoder[0].shape[0]
        cache = kwargs.get(self._cache_kwarg)
        if cache is not None and not isinstance(cache, EncoderDecoderCache):
            raise AdapterError(f"prefix-tuning on an encoder-decoder needs transformers' EncoderDecoderCache, got "
                               f"{type(cache).__name__}: generate without cache_implementation")
        if (mask := kwargs.get("decoder_attention_mask")) is not None:
            kwargs["decoder_attention_mask"] = self.extended_mask(mask, batch)
        if cache is None or cache.get_seq_length() == 0:
            self.inject(model, kwargs, batch)
        return kwargs

    def inject(self, model: nn.Module, kwargs: dict[str, Any], batch: int) -> None:
        if model.training and torch.is_grad_enabled() and gradient_checkpointing(model):
            # transformers drops the cache inside checkpointed layers, which would drop the prefix silently
            raise AdapterError("prefix-tuning cannot train with gradient checkpointing (the checkpointed layers drop "
                               "the key/value cache that carries the prefix): disable gradient_checkpointing")
        cache = kwargs.get(self._cache_kwarg)
        key_values = self.key_values(batch, model.get_input_embeddings().weight.dtype)
        if self.task == "seq2seq":
            if cache is None:
                cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            layers, target = len(key_values), cache.self_attention_cache
            key_values = [key_values[2 * i % layers] for i in range(layers)]  # peft's layout, see the Note
        else:
            if cache is None:
                cache = DynamicCache(config=model.config)
            target = cache
        for layer, (key, value) in enumerate(key_values):
            target.update(key, value, layer)
        kwargs[self._cache_kwarg] = cache

    @torch.no_grad()
    def init_from_tokens(self, model: nn.Module, token_ids: torch.Tensor) -> None:
        """Start from the keys/values the model computes for real tokens at positions 0..n-1.

        Real tokens then sit at positions n, n + 1, ..., so the fresh adapter behaves exactly
        like the base model reading those tokens first. With a projection, the MLP's last layer
        is solved by least squares so that it reproduces that prefix.
        """
        cache = DynamicCache(config=model.config)
        model(input_ids=token_ids[None], **{cache_kwarg(model): cache}, use_cache=True)
        layers = [(layer.keys[0], layer.values[0]) for layer in cache.layers]  # (heads, n, hd) each
        flat = torch.stack([torch.stack(kv) for kv in layers])  # (layers, 2, heads, n, hd)
        target = flat.permute(3, 0, 1, 2, 4).reshape(self.num_virtual_tokens, -1).float()
        if self.transform is None:
            self.embedding.weight.copy_(target)
            return
        hidden = self.transform[1](self.transform[0](self.embedding.weight)).double()  # (n, hidden)
        design = torch.cat([hidden, hidden.new_ones(len(hidden), 1)], dim=1)
        solution = torch.linalg.lstsq(design, target.double()).solution  # (hidden + 1, width)
        self.transform[2].weight.copy_(solution[:-1].T)
        self.transform[2].bias.copy_(solution[-1])


class PrefixMethod:
    """Prefix-tuning answering the adapter protocol (see `peftkit.protocol.AdapterMethod`)."""

    name = "prefix"
    mergeable = False
    padding_free = False  # virtual tokens need the padded layout
    peft_type = "PREFIX_TUNING"
    config_class = PrefixConfig

    def apply(self, model: nn.Module, cfg: PrefixConfig) -> nn.Module:
        """Attach a prefix shaped for the model's layers, key/value heads and head dim.

        Raises:
            AdapterError: the model takes no key/value cache (a causal LM, an encoder-decoder or
                a classifier whose backbone takes one), or is an encoder-decoder with unequal
                encoder and decoder depth.
            ConfigError: init: tokens on an encoder-decoder, or with an MLP too narrow to
                reproduce the token prefix, or an init_text without a tokenizer.
        """
        task = task_of_model(model)
        layers, heads, head_dim = kv_layout(model)
        if task == "seq2seq":
            decoder_layers = getattr(model.config, "num_decoder_layers", layers)
            if decoder_layers != layers:
                raise AdapterError(f"prefix-tuning on {type(model).__name__} with {layers} encoder and "
                                   f"{decoder_layers} decoder layers is not supported: peft's encoder-decoder "
                                   f"prefix assumes equal depths; use prompt tuning or LoRA here")
            if cfg.init == "tokens":
                raise ConfigError("init: tokens is for decoders (the prefix repeats the model's own keys/values); on "
                                  "an encoder-decoder use init: random")
        hidden = cfg.encoder_hidden_size or heads * head_dim
        if cfg.init == "tokens" and cfg.prefix_projection and hidden < cfg.num_virtual_tokens:
            raise ConfigError(f"init: tokens with prefix_projection needs encoder_hidden_size >= num_virtual_tokens "
                              f"({hidden} < {cfg.num_virtual_tokens}) so the MLP can reproduce the token prefix: "
                              f"raise encoder_hidden_size")
        encoder = PrefixEncoder(cfg.num_virtual_tokens, layers, heads, head_dim, cfg.prefix_projection,
                                cfg.encoder_hidden_size, task, dtype=adapter_dtype(model),
                                device=model.get_input_embeddings().weight.device)
        if cfg.init == "tokens":  # before attaching: the base model computes the token prefix
            encoder.init_from_tokens(model, init_token_ids(model, cfg.num_virtual_tokens, cfg.init_text))
        encoder.attach(model)
        return model

    def merge(self, model: nn.Module) -> None:
        raise AdapterError("prefix-tuning cannot be merged: its prefix is extra attention context, not a weight "
                           "update; ship the adapter directory (save_adapter) and load it with peftkit.load_adapter "
                           "or peft's PeftModel.from_pretrained")

    def unmerge(self, model: nn.Module) -> None:
        raise AdapterError("prefix-tuning is never merged: nothing to unmerge")

    def unload(self, model: nn.Module) -> nn.Module:
        """Remove the prefix and its hooks, leaving the plain base model."""
        encoder = getattr(model, PrefixEncoder.attribute, None)
        if encoder is not None:
            encoder.detach(model)
        return model

    def to_peft_config(self, cfg: PrefixConfig, model: nn.Module) -> dict:
        layers, heads, head_dim = kv_layout(model)
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens,
            "token_dim": heads * head_dim, "num_attention_heads": heads, "num_layers": layers,
            "num_transformer_submodules": transformer_submodules(task_of_model(model)),
            "prefix_projection": cfg.prefix_projection,
            "encoder_hidden_size": cfg.encoder_hidden_size or heads * head_dim, "init_weights": None,
            "modules_to_save": None, "inference_mode": True,
        }

    def from_peft_config(self, peft: dict) -> PrefixConfig:
        """A saved prefix is always plain (peft folds any MLP when saving), so the config is too."""
        check_prompt_learning_config(peft)
        return PrefixConfig(num_virtual_tokens=peft["num_virtual_tokens"])
