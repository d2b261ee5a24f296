"""Virtual tokens: the plumbing prefix-tuning and prompt tuning share, on each task peft gives them.

`num_virtual_tokens` trained positions sit in front of every sequence. They enter the frozen
model through forward hooks on the model instance, so the model stays the same object; the
adapter is a submodule (`model.peftkit_prefix` / `model.peftkit_prompt`), and `unload` removes
it and its hooks again. What the hooks do follows peft 0.21's `PeftModelFor*` classes:

    causal-lm   mask gains n leading ones; real tokens sit at positions n, n + 1, ...
    seq2seq     prompt: the encoder's input and mask; prefix: the decoder's self-attention
                cache and mask (see `peftkit.methods.prefix` for peft's layer layout)
    seq-cls     prompt: embeddings, mask and token types gain n leading entries; prefix: every
                layer's self-attention cache starts with the prefix, the mask gains n ones
    token-cls   the same, and prompt tuning's labels gain n leading -100 (logits cover the real tokens)

On decoders, positions of real tokens follow the attention mask (as in `generate`), so a
left-padded row gives the same logits as the unpadded one; peft's forward counts left pads as
positions, so the two agree on unpadded and right-padded input, and on left-padded input given
explicit `position_ids`. Masks passed in never include the virtual tokens; peftkit adds them.

Prefix-tuning on classifiers (BERT seq-cls / token-cls, a Qwen2 seq-cls head): transformers 5
passes the cache to the backbone as `cache` through **kwargs, and BERT's self-attention still
prepends a cache's keys and values (its embeddings then place real tokens at n, n + 1, ..., as
P-tuning v2 ran it). peft 0.21 looks for a `past_key_values` argument and raises "Model does
not support past key values" on every classifier, so there is no peft reference: the tests
check ours against the attention equation layer by layer, and that each side reads the other's
files.
"""

import inspect
import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import DynamicCache

from peftkit.errors import AdapterError, ConfigError

CACHED_TASKS = ("causal-lm", "seq2seq")  # the tasks that generate, through a key/value cache
TOKEN_TASKS = ("causal-lm", "token-cls")  # labels and logits per token: virtual tokens get -100, logits are cut


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


def transformer_submodules(task: str) -> int:
    """peft's `num_transformer_submodules`: 2 on encoder-decoders, 1 elsewhere."""
    return 2 if task == "seq2seq" else 1


def check_prompt_learning_config(peft: dict) -> None:
    """Reject prompt-learning layouts peft does not write by default, and configs without a length."""
    seq2seq = peft.get("task_type") == "SEQ_2_SEQ_LM"
    expected = transformer_submodules("seq2seq" if seq2seq else "causal-lm")
    if peft.get("num_transformer_submodules") not in (expected, None):
        raise AdapterError(f"adapter_config.json sets num_transformer_submodules={peft['num_transformer_submodules']!r}"
                           f" for task_type {peft.get('task_type')!r}, but peft's layout is {expected} (2 only for an "
                           f"encoder-decoder, SEQ_2_SEQ_LM): re-save the adapter with peft's defaults")
    if "num_virtual_tokens" not in peft:
        raise AdapterError("adapter_config.json has no num_virtual_tokens: re-save the adapter")


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


class VirtualTokens(nn.Module, ABC):
    """`num_virtual_tokens` trained positions in front of every sequence, fed in by forward hooks.

    The pre-hook turns every call into keywords and hands them to `prepare`. On decoders it
    prepends ones to the attention mask, shifts positions by `num_virtual_tokens`, and on the
    first forward of a sequence (no cache, or an empty one) calls `inject`; later calls, such
    as generate's decoding steps, find the virtual tokens already in the cache. The methods
    override `prepare` for the other tasks.
    """

    attribute: ClassVar[str]  # the model attribute that holds the adapter
    needs_cache: ClassVar[bool] = False  # enters through the key/value cache on every task (prefix-tuning)

    def __init__(self, num_virtual_tokens: int, task: str = "causal-lm") -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.task = task
        self._positional: tuple[str, ...] = ()
        self._cache_kwarg = "cache"

    @abstractmethod
    def inject(self, model: nn.Module, kwargs: dict[str, Any], batch: int) -> None:
        """Put the virtual tokens into a first forward's keyword arguments (in place)."""

    def attach(self, model: nn.Module) -> None:
        self._positional = positional_names(model)
        if self.task in CACHED_TASKS or self.needs_cache:
            self._cache_kwarg = cache_kwarg(model)
        setattr(model, self.attribute, self)
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def detach(self, model: nn.Module) -> None:
        """Remove the submodule and the hooks it put on any module, found by owner so a deep copy removes its own."""
        for module in model.modules():
            for hooks, flags in ((module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs),
                                 (module._forward_hooks, module._forward_hooks_with_kwargs)):
                for key in [key for key, hook in hooks.items() if getattr(hook, "__self__", None) is self]:
                    del hooks[key]
                    flags.pop(key, None)
        delattr(model, self.attribute)

    def as_kwargs(self, names: tuple[str, ...], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Every argument of a forward call by name, the cache under the forward's own name."""
        kwargs = {**dict(zip(names, args)), **kwargs}
        if self._cache_kwarg != "past_key_values" and "past_key_values" in kwargs:
            kwargs.setdefault(self._cache_kwarg, kwargs.pop("past_key_values"))  # transformers' deprecated name
        return kwargs

    @staticmethod
    def inputs(kwargs: dict[str, Any]) -> torch.Tensor | None:
        return kwargs.get("inputs_embeds") if kwargs.get("input_ids") is None else kwargs["input_ids"]

    def extended_mask(self, mask: Any, batch: int) -> torch.Tensor:
        """A (batch, tokens) mask with `num_virtual_tokens` leading ones."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise AdapterError(f"{type(self).__name__} needs a 2D attention mask (batch, tokens), got "
                               f"{getattr(mask, 'shape', type(mask).__name__)}: pass the tokenizer's mask")
        return torch.cat([mask.new_ones(batch, self.num_virtual_tokens), mask], dim=1)

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        if kwargs.get("adapter_names") is not None:
            raise AdapterError("mixed-adapter batches (adapter_names) route rows through adapted layers, and prefix "
                               "and prompt tuning have none: run one adapter at a time")
        return (), self.prepare(model, self.as_kwargs(self._positional, args, kwargs))

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """A decoder's forward arguments with the virtual tokens in (see the class docstring)."""
        inputs = self.inputs(kwargs)
        if inputs is None:
            return kwargs  # the model raises its own error
        batch, length = inputs.shape[:2]
        cache = kwargs.get(self._cache_kwarg)
        if cache is not None and not isinstance(cache, DynamicCache):
            raise AdapterError(f"{type(self).__name__} needs transformers' DynamicCache, got {type(cache).__name__}: "
                               f"generate without cache_implementation (the dynamic cache is the default)")
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        if mask is not None:
            kwargs["attention_mask"] = self.extended_mask(mask, batch)
            if positions is None:  # positions of real tokens follow the mask, as generate computes them
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]
        if positions is not None:
            kwargs["position_ids"] = positions + self.num_virtual_tokens  # peft: "offset position_ids"
        if cache is None or cache.get_seq_length() == 0:
            self.inject(model, kwargs, batch)
        return kwargs


def positional_names(module: nn.Module) -> tuple[str, ...]:
    """The names of a forward's positional-or-keyword parameters, in order."""
    params = inspect.signature(module.forward).parameters
    return tuple(name for name, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD)


def cache_kwarg(model: nn.Module) -> str:
    """The forward's cache argument: `cache` in recent transformers, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes it on
    params = inspect.signature(base.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    if any(p.kind is p.VAR_KEYWORD for p in params.values()) and "cache" in inspect.signature(
            base.base_model.forward).parameters:
        return "cache"  # a task head passes it to its backbone through **kwargs (BertForSequenceClassification)
    raise AdapterError(f"{type(model).__name__}.forward takes no key/value cache: virtual tokens need a "
                       f"transformers causal LM or encoder-decoder")


def gradient_checkpointing(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
