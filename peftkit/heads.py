"""Task heads that a classification task trains fully, beside any adapter: peft's `modules_to_save`.

A `seq-cls` or `token-cls` model's head (`classifier`, or `score` on decoders) is created fresh
by transformers, so an adapter that left it frozen could not learn the task. Every method trains
it whole and saves it under peft's keys (`base_model.model.classifier.weight`, ...), with
`modules_to_save: [classifier, score]` in adapter_config.json, as peft does; both load it back.
"""

from torch import nn

from peftkit.errors import AdapterError
from peftkit.models.tasks import HEAD_NAMES, task_of_model

CLASSIFICATION_TASKS = ("seq-cls", "token-cls")


def trained_heads(model: nn.Module) -> dict[str, nn.Module]:
    """The heads a classification model trains fully, by attribute name (empty for other tasks)."""
    if task_of_model(model) not in CLASSIFICATION_TASKS:
        return {}
    return {name: getattr(model, name) for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)}


def mark_heads(model: nn.Module) -> list[str]:
    """Declare each head's parameters as adapter parameters (so they train and save); returns the names."""
    heads = trained_heads(model)
    for head in heads.values():
        head.adapter_parameter_names = tuple(name for name, _ in head.named_parameters())
    return list(heads)


def unmark_heads(model: nn.Module) -> None:
    """The heads become part of the plain model again (after unload: merged weights keep the trained head)."""
    for head in trained_heads(model).values():
        head.__dict__.pop("adapter_parameter_names", None)


def peft_modules_to_save(model: nn.Module) -> list[str] | None:
    """adapter_config.json's `modules_to_save`: peft's classification default, both head names."""
    return list(HEAD_NAMES) if trained_heads(model) else None


def check_modules_to_save(saved: list[str] | None, model: nn.Module, source: str) -> None:
    """A saved adapter's `modules_to_save` must be heads this model trains.

    Raises:
        AdapterError: other modules are listed, or the adapter has a head and the model none.
    """
    saved = list(saved or [])
    unknown = sorted(set(saved) - set(HEAD_NAMES))
    if unknown:
        raise AdapterError(f"{source} sets modules_to_save={saved!r}; peftkit trains and restores only the task heads "
                           f"{list(HEAD_NAMES)}: re-save the adapter without {unknown}")
    if saved and not trained_heads(model):
        raise AdapterError(f"{source} carries a trained classification head ({', '.join(saved)}) but the model is a "
                           f"{type(model).__name__}: load the base with task='seq-cls' or 'token-cls' and the same "
                           f"num_labels")
