"""Prompt tuning (Lester et al., 2021), from scratch: trained soft input embeddings.

`num_virtual_tokens` embeddings are prepended to the input embeddings on the first forward of a
sequence; the frozen model reads them like the embeddings of a text (which is how `init: tokens`
starts them, like peft's `PromptTuningInit.TEXT` / `SAMPLE_VOCAB`):

    inputs_embeds (batch, L, hidden) -> cat(prompt (n, hidden) per row, inputs_embeds) (batch, n + L, hidden)

As in peft, the attention mask gains n leading ones and the virtual tokens take positions
0..n-1. Per task (peft's `PeftModelFor*`):

    causal-lm   labels gain n leading -100 (the first real token is predicted from the last
                virtual one)
    seq-cls     token types gain n leading zeros; labels and logits are per sequence
    token-cls   the same, and labels gain n leading -100; peft 0.21 leaves the labels as they
                are, so its loss fails on the length mismatch
    seq2seq     the prompt goes in front of the encoder's input only, which also feeds the
                decoder's cross-attention; like peft, the table holds 2n rows (peft's
                num_transformer_submodules=2), of which only the first n are ever read

Unlike peft, per-token logits cover the real tokens only (batch, L, ...), as with every other
method, so evaluation and trainers never branch on the method. The plumbing (hooks, masks,
positions, generate) is shared with prefix-tuning, see `peftkit.methods.virtual_tokens`.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftkit.errors import AdapterError
from peftkit.models.tasks import task_of_model
from peftkit.methods.virtual_tokens import (TOKEN_TASKS, VirtualTokens, adapter_dtype, check_init, check_prompt_learning_config,
                                    check_virtual_tokens, init_token_ids, positional_names,
                                    transformer_submodules)

PROMPT_INITS = ("random", "tokens")


@dataclass
class PromptConfig:
    """A prompt-tuning adapter, as written in an `adapters/*.yaml` preset."""

    method: ClassVar[str] = "prompt"
    num_virtual_tokens: int = 20  # trained embeddings in front of every input
    init: str = "random"  # random: N(0, 1) as peft; tokens: embeddings of real tokens
    init_text: str | None = None  # init: tokens starts from this text (peft's TEXT); None: random vocabulary tokens

    def __post_init__(self) -> None:
        check_virtual_tokens(self.num_virtual_tokens)
        check_init(self.init, self.init_text, PROMPT_INITS)


class PromptEmbedding(VirtualTokens):
    """The soft prompt, an (n, hidden) `nn.Embedding` named as in peft's `PromptEmbedding`
    ((2n, hidden) on an encoder-decoder, peft's layout)."""

    attribute = "peftkit_prompt"

    def __init__(self, num_virtual_tokens: int, hidden_size: int, task: str = "causal-lm", *,
                 dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        super().__init__(num_virtual_tokens, task)
        rows = num_virtual_tokens * transformer_submodules(task)
        self.embedding = nn.Embedding(rows, hidden_size, dtype=dtype, device=device)
        self._call: tuple[int, bool] | None = None  # (real length, tuple wanted) from the pre- to the post-hook
        self._encoder_positional: tuple[str, ...] = ()

    adapter_parameter_names = ("embedding.weight",)

    def peft_parameters(self) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.embedding.weight}

    def attach(self, model: nn.Module) -> None:
        """Hook the model; an encoder-decoder's encoder too, which generate calls on its own."""
        super().attach(model)
        model.register_forward_hook(self._after_forward, with_kwargs=True)
        if self.task == "seq2seq":
            encoder = model.get_encoder()
            self._encoder_positional = positional_names(encoder)
            encoder.register_forward_pre_hook(self._before_encoder, with_kwargs=True)

    def _before_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = self.as_kwargs(self._positional, args, kwargs)
        inputs = self.inputs(kwargs)
        per_token = inputs is not None and self.task in TOKEN_TASKS
        self._call = (inputs.shape[1], kwargs.get("return_dict") is False) if per_token else None
        if self._call is not None and self._call[1]:
            kwargs["return_dict"] = True  # the post-hook trims the logits, then makes the tuple
        return super()._before_forward(model, (), kwargs)

    def prepare(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Decoders: see `VirtualTokens.prepare`; encoder-decoders and classifiers: see the module docstring."""
        if self.task == "causal-lm":
            return super().prepare(model, kwargs)
        if self.task == "seq2seq":
            return self.prepare_cross_attention(kwargs)
        inputs = self.inputs(kwargs)
        if inputs is None:
            return kwargs  # the model raises its own error
        batch, n = inputs.shape[0], self.num_virtual_tokens
        if (mask := kwargs.get("attention_mask")) is not None:
            kwargs["attention_mask"] = self.extended_mask(mask, batch)
        if (types := kwargs.get("token_type_ids")) is not None:  # the virtual tokens are of type 0, as in peft
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types.expand(batch, -1)], dim=1)
        if (positions := kwargs.get("position_ids")) is not None:
            kwargs["position_ids"] = positions + n
        self.inject(model, kwargs, batch)
        return kwargs

    def prepare_cross_attention(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The encoder-decoder's mask, which the decoder's cross-attention reads too, gains n leading
        ones (unless it already covers the prompt: the encoder hook then leaves it alone)."""
        mask, encoded, inputs = kwargs.get("attention_mask"), kwargs.get("encoder_outputs"), self.inputs(kwargs)
        if mask is None or (encoded is None and inputs is None):
            return kwargs
        real = inputs.shape[1] if encoded is None else encoded[0].shape[1] - self.num_virtual_tokens
        if getattr(mask, "shape", (None,))[-1] == real:
            kwargs["attention_mask"] = self.extended_mask(mask, mask.shape[0])
        return kwargs

    def _before_encoder(self, encoder: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        kwargs = self.as_kwargs(self._encoder_positional, args, kwargs)
        inputs = self.inputs(kwargs)
        if inputs is None:
            return (), kwargs
        batch, length = inputs.shape[:2]
        if (mask := kwargs.get("attention_mask")) is not None and getattr(mask, "shape", (None,))[-1] == length:
            kwargs["attention_mask"] = self.extended_mask(mask, batch)  # generate calls the encoder on its own
        self.inject(encoder, kwargs, batch)
        return (), kwargs

    def inject(self, model: nn.Module, kwargs: dict[str, Any], batch: int) -> None:
        n = self.num_virtual_tokens
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = model.get_input_embeddings()(kwargs["input_ids"])
        prompt = self.embedding.weight[:n].to(embeds.dtype).expand(batch, -1, -1)  # seq2seq: the encoder's rows
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        if (positions := kwargs.get("position_ids")) is not None:
            virtual = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(batch, n)
            kwargs["position_ids"] = torch.cat([virtual, positions.expand(batch, -1)], dim=1)
        if (labels := kwargs.get("labels")) is not None and self.task in TOKEN_TASKS:
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)

    def _after_forward(self, model: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if self._call is None:
            return output
        length, wants_tuple = self._call
        self._call = None
        if getattr(output, "logits", None) is not None:
            output.logits = output.logits[:, -length:]  # the real tokens' logits only
        return output.to_tuple() if wants_tuple else output


class PromptMethod:
    """Prompt tuning answering the adapter protocol (see `peftkit.protocol.AdapterMethod`)."""

    name = "prompt"
    mergeable = False
    padding_free = False  # virtual tokens need the padded layout
    peft_type = "PROMPT_TUNING"
    config_class = PromptConfig

    def apply(self, model: nn.Module, cfg: PromptConfig) -> nn.Module:
        task = task_of_model(model)
        embeddings = model.get_input_embeddings()
        prompt = PromptEmbedding(cfg.num_virtual_tokens, embeddings.embedding_dim, task, dtype=adapter_dtype(model),
                                 device=embeddings.weight.device)
        if cfg.init == "tokens":  # every row, as peft's init (on an encoder-decoder also the unread ones)
            ids = init_token_ids(model, prompt.embedding.num_embeddings, cfg.init_text)
            with torch.no_grad():
                prompt.embedding.weight.copy_(embeddings(ids).float())
        prompt.attach(model)
        return model

    def merge(self, model: nn.Module) -> None:
        raise AdapterError("prompt tuning cannot be merged: its soft prompt is extra input, not a weight update; "
                           "ship the adapter directory (save_adapter) and load it with peftkit.load_adapter or "
                           "peft's PeftModel.from_pretrained")

    def unmerge(self, model: nn.Module) -> None:
        raise AdapterError("prompt tuning is never merged: nothing to unmerge")

    def unload(self, model: nn.Module) -> nn.Module:
        """Remove the soft prompt and its hooks, leaving the plain base model."""
        prompt = getattr(model, PromptEmbedding.attribute, None)
        if prompt is not None:
            prompt.detach(model)
        return model

    def to_peft_config(self, cfg: PromptConfig, model: nn.Module) -> dict:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if cfg.init == "random":
            init = {"prompt_tuning_init": "RANDOM"}
        elif cfg.init_text is None:
            init = {"prompt_tuning_init": "SAMPLE_VOCAB"}
        else:  # peft requires a tokenizer with TEXT, though it only reads it when training
            init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": cfg.init_text,
                    "tokenizer_name_or_path": getattr(model, "name_or_path", None)}
        return {
            "peft_type": self.peft_type, "task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens,
            "token_dim": model.get_input_embeddings().embedding_dim, "num_attention_heads": config.num_attention_heads,
            "num_layers": config.num_hidden_layers,
            "num_transformer_submodules": transformer_submodules(task_of_model(model)), "modules_to_save": None,
            "inference_mode": True, **init,
        }

    def from_peft_config(self, peft: dict) -> PromptConfig:
        """The init is moot once the saved embeddings are loaded, so it is not repeated (no tokenizer needed)."""
        check_prompt_learning_config(peft)
        return PromptConfig(num_virtual_tokens=peft["num_virtual_tokens"])
