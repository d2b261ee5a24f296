"""Prefix-tuning (Li and Liang, 2021), from scratch, plus the plumbing it shares with prompt tuning.

Prefix-tuning trains `num_virtual_tokens` key/value pairs for every attention layer; every real
token attends to them as if a (virtual) text preceded it. The prefix enters the frozen model as
the first entries of transformers' `DynamicCache`, built on the first forward of a sequence:

    prefix: (n, layers * 2 * kv_heads * head_dim)     peft's layout, saved as `prompt_embeddings`
      -> per layer: key, value (batch, kv_heads, n, head_dim)   -> DynamicCache, then the input

Optionally (section 4.3 of the paper) the prefix is reparameterised while training as
MLP(embedding): Embedding(n, kv width) -> Linear -> Tanh -> Linear, peft's `PrefixEncoder`; the
MLP is folded into a plain prefix when saving, so a saved adapter is always plain.

Like peft (`PeftModelForCausalLM.forward`), the attention mask gains `n` leading ones and real
tokens sit at positions `n, n + 1, ...`: the virtual tokens occupy positions 0..n-1. Positions
of real tokens follow the attention mask (as in `generate`), so a left-padded row gives the same
logits as the unpadded one; peft's forward counts left pads as positions, so the two agree on
unpadded and right-padded input, and on left-padded input given explicit `position_ids`. Masks
passed in never include the virtual tokens; peftkit adds them.

The model stays the same object: the adapter is a submodule (`model.peftkit_prefix`) and a
forward pre-hook on the model instance, both removed again by `unload`.
"""

import inspect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache

from peftkit.errors import AdapterError, ConfigError

PREFIX_INITS = ("random", "tokens")


def check_virtual_tokens(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"num_virtual_tokens must be a positive integer, got {n!r}: 20 is a common choice")


def check_init(init: Any, init_text: Any, inits: tuple[str, ...]) -> None:
    if init not in inits:
        raise ConfigError(f"init must be one of {inits}, got {init!r}")
    if init_text is not None and (not isinstance(init_text, str) or not init_text):
        raise ConfigError(f"init_text must be a non-empty string, got {init_text!r}")
    if init_text is not None and init != "tokens":
        raise ConfigError(f"init_text is only used with init: tokens, but init is {init!r}: set init: tokens")


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
    """(layers, key/value heads, head dim) of a decoder, worked out as peft does (GQA aware)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    try:
        layers, heads = config.num_hidden_layers, config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    except AttributeError as exc:
        raise AdapterError(f"{type(model).__name__} has no decoder attention layout in its config ({exc}): "
                           f"prefix-tuning needs a transformers causal LM") from None
    return layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def adapter_dtype(model: nn.Module) -> torch.dtype:
    """Virtual tokens stay in fp32 over a half-precision base, for stable updates (as peft does)."""
    dtype = model.get_input_embeddings().weight.dtype
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def load_tokenizer(model: nn.Module) -> Any:
    """The tokenizer of the model's own directory (the registry's tiny models build their own)."""
    from peftkit.models import REGISTRY

    source = getattr(model, "name_or_path", None) or ""
    if source in REGISTRY and REGISTRY[source].is_tiny:
        from peftkit.models.tiny import tiny_tokenizer

        return tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"init_text needs the model's tokenizer, which cannot be loaded from {source!r} "
                          f"({type(exc).__name__}): load the model from a directory with its tokenizer, "
                          f"or drop init_text") from None


def init_token_ids(model: nn.Module, count: int, text: str | None) -> torch.Tensor:
    """`count` token ids: the text's, repeated or cut to length (peft's TEXT init), else random ones."""
    embeddings = model.get_input_embeddings()
    if text is None:
        return torch.randint(0, embeddings.num_embeddings, (count,), device=embeddings.weight.device)
    ids = load_tokenizer(model)(text)["input_ids"]
    if not ids:
        raise ConfigError(f"init_text {text!r} gives no tokens: use a longer text")
    ids = (ids * math.ceil(count / len(ids)))[:count]
    return torch.tensor(ids, dtype=torch.long, device=embeddings.weight.device)


def check_decoder(model: nn.Module, method: str) -> None:
    """Virtual tokens are implemented for decoders (causal LMs); other tasks get a one-line error."""
    from peftkit.models.tasks import task_of_model

    task = task_of_model(model)
    if task != "causal-lm":
        raise AdapterError(f"{method} on a {task} model ({type(model).__name__}) is not supported yet: peftkit's "
                           f"virtual tokens are checked against peft on causal LMs only; use LoRA (or DoRA) here")


def check_prompt_learning_config(peft: dict) -> None:
    """Reject what peftkit's prefix and prompt tuning do not do: encoder-decoders, extra modules."""
    if peft.get("num_transformer_submodules") not in (1, None):
        raise AdapterError(f"adapter_config.json sets num_transformer_submodules="
                           f"{peft['num_transformer_submodules']!r} (an encoder-decoder adapter): peftkit loads "
                           f"decoder-only (CAUSAL_LM) adapters")
    if "num_virtual_tokens" not in peft:
        raise AdapterError("adapter_config.json has no num_virtual_tokens: re-save the adapter")


class VirtualTokens(nn.Module, ABC):
    """`num_virtual_tokens` trained positions in front of every sequence, fed in by forward hooks.

    The pre-hook turns every call into keywords, prepends ones to the attention mask, shifts
    positions by `num_virtual_tokens`, and on the first forward of a sequence (no cache, or an
    empty one) calls `inject`. Later calls, such as generate's decoding steps, find the virtual
    tokens already in the cache.
    """

    attribute: ClassVar[str]  # the model attribute that holds the adapter

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self._positional: tuple[str, ...] = ()
        self._cache_kwarg = "cache"

    @abstractmethod
    def inject(self, model: nn.Module, kwargs: dict[str, Any], batch: int) -> None:
        """Put the virtual tokens into a first forward's keyword arguments (in place)."""

    def attach(self, model: nn.Module) -> None:
        params = inspect.signature(model.forward).parameters
        self._positional = tuple(name for name, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD)
        self._cache_kwarg = cache_kwarg(model)
        setattr(model, self.attribute, self)
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def detach(self, model: nn.Module) -> None:
        """Remove the submodule and its hooks, found by owner so that a deep copy removes its own."""
        for hooks, flags in ((model._forward_pre_hooks, model._forward_pre_hooks_with_kwargs),
                             (model._forward_hooks, model._forward_hooks_with_kwargs)):
            for key in [key for key, hook in hooks.items() if getattr(hook, "__self__", None) is self]:
                del hooks[key]
                flags.pop(key, None)
        delattr(model, self.attribute)

    def as_kwargs(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every argument of a forward call by name, the cache under the forward's own name."""
        kwargs = {**dict(zip(self._positional, args)), **kwargs}
        if self._cache_kwarg != "past_key_values" and "past_key_values" in kwargs:
            kwargs.setdefault(self._cache_kwarg, kwargs.pop("past_key_values"))  # transformers' deprecated name
        return kwargs

    @staticmethod
    def inputs(kwargs: dict[str, Any]) -> torch.Tensor | None:
        return kwargs.get("inputs_embeds") if kwargs.get("input_ids") is None else kwargs["input_ids"]

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = self.as_kwargs(args, kwargs)
        inputs = self.inputs(kwargs)
        if inputs is None:
            return (), kwargs  # the model raises its own error
        batch, length = inputs.shape[:2]
        cache = kwargs.get(self._cache_kwarg)
        if cache is not None and not isinstance(cache, DynamicCache):
            raise AdapterError(f"{type(self).__name__} needs transformers' DynamicCache, got {type(cache).__name__}: "
                               f"generate without cache_implementation (the dynamic cache is the default)")
        n = self.num_virtual_tokens
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                raise AdapterError(f"{type(self).__name__} needs a 2D attention mask (batch, tokens), got "
                                   f"{getattr(mask, 'shape', type(mask).__name__)}: pass the tokenizer's mask")
            if positions is None:  # positions of real tokens follow the mask, as generate computes them
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if positions is not None:
            kwargs["position_ids"] = positions + n  # peft: "offset position_ids by num_virtual_tokens"
        if cache is None or cache.get_seq_length() == 0:
            self.inject(model, kwargs, batch)
        return (), kwargs


def cache_kwarg(model: nn.Module) -> str:
    """The forward's cache argument: `cache` in recent transformers, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes it on
    params = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise AdapterError(f"{type(model).__name__}.forward takes no key/value cache: virtual tokens need a "
                       f"transformers causal LM")


def gradient_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


class PrefixEncoder(VirtualTokens):
    """The trained prefix: a plain (n, layers * 2 * kv width) table, or an MLP over n embeddings.

    Parameter names follow peft's `PrefixEncoder` (`embedding.weight`, `transform.0.weight`, ...),
    so weights copy across directly.

    Args:
        num_virtual_tokens: n, the prefix length.
        layers, heads, head_dim: the model's layer count, key/value heads and head dim.
        projection: train through Embedding -> Linear -> Tanh -> Linear (Li and Liang, 4.3).
        encoder_hidden_size: the MLP's hidden width.
    """

    attribute = "peftkit_prefix"

    def __init__(self, num_virtual_tokens: int, layers: int, heads: int, head_dim: int, projection: bool = False,
                 encoder_hidden_size: int | None = None, *, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__(num_virtual_tokens)
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

    def inject(self, model: nn.Module, kwargs: dict[str, Any], batch: int) -> None:
        if model.training and torch.is_grad_enabled() and gradient_checkpointing(model):
            # transformers drops the cache inside checkpointed layers, which would drop the prefix silently
            raise AdapterError("prefix-tuning cannot train with gradient checkpointing (the checkpointed layers drop "
                               "the key/value cache that carries the prefix): disable gradient_checkpointing")
        cache = kwargs.get(self._cache_kwarg)
        if cache is None:
            cache = DynamicCache(config=model.config)
        dtype = model.get_input_embeddings().weight.dtype
        for layer, (key, value) in enumerate(self.key_values(batch, dtype)):
            cache.update(key, value, layer)
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
    peft_type = "PREFIX_TUNING"
    config_class = PrefixConfig

    def apply(self, model: nn.Module, cfg: PrefixConfig) -> nn.Module:
        """Attach a prefix shaped for the model's layers, key/value heads and head dim.

        Raises:
            AdapterError: the model is not a transformers causal LM with a key/value cache.
            ConfigError: init: tokens with an MLP too narrow to reproduce the token prefix, or an
                init_text without a tokenizer.
        """
        check_decoder(model, "prefix-tuning")
        layers, heads, head_dim = kv_layout(model)
        hidden = cfg.encoder_hidden_size or heads * head_dim
        if cfg.init == "tokens" and cfg.prefix_projection and hidden < cfg.num_virtual_tokens:
            raise ConfigError(f"init: tokens with prefix_projection needs encoder_hidden_size >= num_virtual_tokens "
                              f"({hidden} < {cfg.num_virtual_tokens}) so the MLP can reproduce the token prefix: "
                              f"raise encoder_hidden_size")
        encoder = PrefixEncoder(cfg.num_virtual_tokens, layers, heads, head_dim, cfg.prefix_projection,
                                cfg.encoder_hidden_size, dtype=adapter_dtype(model),
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
            "num_transformer_submodules": 1, "prefix_projection": cfg.prefix_projection,
            "encoder_hidden_size": cfg.encoder_hidden_size or heads * head_dim, "init_weights": None,
            "modules_to_save": None, "inference_mode": True,
        }

    def from_peft_config(self, peft: dict) -> PrefixConfig:
        """A saved prefix is always plain (peft folds any MLP when saving), so the config is too."""
        check_prompt_learning_config(peft)
        return PrefixConfig(num_virtual_tokens=peft["num_virtual_tokens"])
