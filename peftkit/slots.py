"""One adapted layer's adapters by name: the container that lets several adapters share one base.

A model with one adapter has no containers: each adapted layer is the method's own layer (a
`LoRALinear`, an `IA3Linear`, ...) over the frozen base, as always. When a second adapter is
added (or a batch names an adapter per row), every adapted layer becomes an `AdapterSlots`:

    q_proj = AdapterSlots(layers={"default": LoRALinear(base), "sql": LoRALinear(base)}, active="default")

Every layer in a container wraps the same base module, so the base weights exist once. The
methods never see names: `view(model, name)` puts one adapter's layers back in the tree for
the length of a block (a layer that adapter does not target gets its bare base), so saving,
loading, merging and counting run on the single-adapter model they were written for.

Mixed-adapter batches route rows at the container: inside `rows(names)` each container runs
every row through the layer its name selects (`"__base__"`, or an adapter that does not
target the layer: the bare base), so a row's output is the output of that row run alone. A
batch k times longer than the names (generate's beams, `num_return_sequences`: each row
repeated in place) gives each name to its k copies; an encoder-decoder's encoder still sees one
row per name.
"""

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from peftkit.errors import AdapterError
from peftkit.targets import replace_module

BASE = "__base__"  # the row name of "no adapter" in a mixed batch, as in peft
_ROWS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("peftkit_rows", default=None)


class AdapterSlots(nn.Module):
    """Adapters by name over one frozen base layer, and the name that runs (`active`; None: the base).

    Args:
        layers: adapter name -> that adapter's layer; every layer's `base` is the same module.
        active: the adapter that runs outside a mixed batch, or None for the bare base.
    """

    def __init__(self, layers: dict[str, nn.Module], active: str | None) -> None:
        super().__init__()
        bases = {id(layer.base) for layer in layers.values()}
        if len(bases) != 1:  # internal invariant: the containers are built by peftkit.named only
            raise AdapterError("adapters in one layer must share its base module: rebuild the model")
        self.layers = nn.ModuleDict(layers)
        self.active = active

    @property
    def base(self) -> nn.Module:
        return next(iter(self.layers.values())).base

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's stored weight, for model code that reads `layer.weight.dtype` (T5)."""
        return next(iter(self.layers.values())).weight

    def layer(self, name: str | None) -> nn.Module:
        """The module that computes for `name`: its adapter layer, or the bare base."""
        return self.layers[name] if name is not None and name in self.layers else self.base

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = _ROWS.get()
        if names is None:
            return self.layer(self.active)(x, *args, **kwargs)
        if x.shape[0] % len(names):
            raise AdapterError(f"adapter_names has {len(names)} names for a batch of {x.shape[0]} rows: pass one name "
                               f"per row")
        if x.shape[0] != len(names):  # generate's beams / return sequences: each row repeated in place
            names = [name for name in names for _ in range(x.shape[0] // len(names))]
        groups: dict[nn.Module, list[int]] = {}
        for row, name in enumerate(names):
            groups.setdefault(self.layer(None if name == BASE else name), []).append(row)
        if len(groups) == 1:
            return next(iter(groups))(x, *args, **kwargs)
        out = None
        for module, rows in groups.items():
            index = torch.tensor(rows, device=x.device)
            y = module(x[index], *args, **kwargs)  # (rows, ..., out)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[index] = y
        return out

    def extra_repr(self) -> str:
        return f"active={self.active!r}"


def containers(model: nn.Module) -> dict[str, AdapterSlots]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterSlots)}


@contextlib.contextmanager
def view(model: nn.Module, name: str | None) -> Iterator[None]:
    """Within the block, the model holds only adapter `name`'s layers (None: only the bare bases).

    A model without containers (one adapter) is left as it is.
    """
    slots = containers(model)
    configs = getattr(model, "peftkit_adapters", None)
    saved = getattr(model, "peftkit_config", None)
    for path, slot in slots.items():
        replace_module(model, path, slot.layer(name))
    if slots and configs is not None:
        model.peftkit_config = configs.get(name)
    try:
        yield
    finally:
        for path, slot in slots.items():
            replace_module(model, path, slot)
        if slots and configs is not None:
            model.peftkit_config = saved


@contextlib.contextmanager
def rows(names: Sequence[str] | None) -> Iterator[None]:
    """Route each batch row through the adapter its name selects, inside the block."""
    token = _ROWS.set(None if names is None else tuple(names))
    try:
        yield
    finally:
        _ROWS.reset(token)
