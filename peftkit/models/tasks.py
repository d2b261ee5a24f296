"""Task types: which transformers head a model carries, and how to tell from a model or a config.

    causal-lm   AutoModelForCausalLM                 decoders (Llama, Gemma 3, Qwen2, GPT-2)
    seq-cls     AutoModelForSequenceClassification   one label per sequence (`classifier` / `score` head)
    token-cls   AutoModelForTokenClassification      one label per token
    seq2seq     AutoModelForSeq2SeqLM                encoder-decoders (T5, BART)

Each task has peft's `task_type` name, so saved adapters say what they were trained for.
"""

from transformers import (AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification, PretrainedConfig)
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from peftkit.errors import ModelError

AUTO_CLASSES: dict[str, type[_BaseAutoModelClass]] = {
    "causal-lm": AutoModelForCausalLM,
    "seq-cls": AutoModelForSequenceClassification,
    "token-cls": AutoModelForTokenClassification,
    "seq2seq": AutoModelForSeq2SeqLM,
}
TASKS = tuple(AUTO_CLASSES)
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS", "token-cls": "TOKEN_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
# The heads a classification task creates fresh: trained fully and saved as peft's `modules_to_save`.
HEAD_NAMES = ("classifier", "score")
_SUFFIXES = {"ForCausalLM": "causal-lm", "LMHeadModel": "causal-lm", "ForSequenceClassification": "seq-cls",
             "ForTokenClassification": "token-cls", "ForConditionalGeneration": "seq2seq"}


def _task_of_class_name(name: str, config: PretrainedConfig) -> str | None:
    for suffix, task in _SUFFIXES.items():
        if name.endswith(suffix):
            # a multimodal decoder (Gemma 3's ForConditionalGeneration) is no encoder-decoder
            return "causal-lm" if task == "seq2seq" and not config.is_encoder_decoder else task
    return None


def check_task(task: str) -> str:
    if task not in AUTO_CLASSES:
        raise ModelError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    return task


def auto_class(task: str, shown_name: str, config: PretrainedConfig | None = None) -> type[_BaseAutoModelClass]:
    """The Auto class of a task; with a config, an error when that model type has no such head.

    Raises:
        ModelError: unknown task, or the model's family cannot do it (seq2seq on a decoder, ...).
    """
    cls = AUTO_CLASSES[check_task(task)]
    if config is not None and type(config) not in cls._model_mapping:
        able = [name for name, other in AUTO_CLASSES.items() if type(config) in other._model_mapping]
        raise ModelError(f"model {shown_name!r} ({config.model_type}) cannot do task {task!r}: "
                         f"its family supports {', '.join(able) or 'none of ' + ', '.join(TASKS)}; "
                         f"set task to one of those or pick another model")
    return cls


def task_of_model(model) -> str:
    """The task of a transformers model, from its class name (a plain base model counts as causal-lm);
    a peft-wrapped model by the model inside."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return _task_of_class_name(type(model).__name__, model.config) or "causal-lm"


def task_of_config(config: PretrainedConfig) -> str:
    """The task a saved model directory was trained for, from its `architectures`."""
    for arch in config.architectures or ():
        if task := _task_of_class_name(arch, config):
            return task
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal-lm"
