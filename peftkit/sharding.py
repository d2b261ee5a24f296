"""Sharded training (`train.distributed: fsdp`): torch's FSDP2 (`fully_shard`) across the
processes of `peftkit train --nproc N` (gloo on CPU, NCCL on GPUs).

Each transformer block (the model's `_no_split_modules` classes) is one FSDP unit: its
parameters live as 1/N shards (`DTensor`s) and are all-gathered just for its forward and its
backward, then freed; the root unit holds the rest (embeddings, final norm, head). Every process
therefore holds 1/N of the model plus one block at a time, instead of the whole model as under
data parallel (DDP).

Only the adapter trains. FSDP2 shards frozen and trainable parameters alike; frozen ones get no
gradient, so each step's reduce-scatter carries the adapter's gradients only, averaged over the
processes as DDP averages them: N processes at batch b take the same steps as one at batch N*b.

Note (QLoRA): the 4-bit base is sharded too. `Linear4bit` keeps its packed codes and block scales
as buffers, which FSDP2 would replicate on every process; `shard_model` turns the large ones into
frozen parameters first, so they are sharded and all-gathered (as bytes) with the rest of their
block. That is the point of FSDP + QLoRA: a base whose 4-bit weights outgrow one device is spread
over all of them, as with Answer.AI's FSDP-QLoRA (which stores bitsandbytes' codes in a float
`quant_storage` for FSDP1; FSDP2 all-gathers mixed dtypes itself). The small nested state (the
scales' own scales, the code table, the offset) stays replicated.

Checkpoints are written from the sharded model: the adapter's tensors and their optimizer state
are gathered whole (they are small) and saved as a one-process run saves them, so a run resumes
into any number of processes, and the saved adapter is the usual peft-format directory.
"""

import contextlib
import itertools
import logging
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from peftkit.errors import ConfigError

logger = logging.getLogger(__name__)

SHARDED_4BIT = ("weight_packed", "weight_absmax")  # Linear4bit's buffers that scale with the weight


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: modules of the classes it names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 over every process: each block one unit, the root one more; in place.

    Raises:
        ConfigError: the model names no transformer blocks (nothing to shard by).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    units = blocks(model)
    if not units:
        raise ConfigError(f"train.distributed: fsdp shards by transformer block, and {type(model).__name__} names "
                          f"none (_no_split_modules): use train.distributed: ddp")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (world_size(),))
    _4bit_as_parameters(model)
    # peftkit's losses read the root's outputs without in-place ops, which is what this warns of
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # transformers' Trainer then treats it as a model sharded while loading: it owns its placement
    # and gradient reduction, so the Trainer neither moves it nor wraps it in DDP
    model._is_distributed_loading_by_transformers = True
    logger.info("FSDP2: %d blocks and the root sharded over %d processes", len(units), world_size())
    return model


def _4bit_as_parameters(model: nn.Module) -> None:
    """Register Linear4bit's packed codes and block scales as frozen parameters, so FSDP2 shards them."""
    from peftkit.nf4 import Linear4bit

    for layer in model.modules():
        if isinstance(layer, Linear4bit):
            for name in SHARDED_4BIT:
                tensor = layer._buffers.pop(name)
                layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a collective: every process must call it), else the tensor."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's shard of a whole tensor, laid out as `like` (a sharded parameter), else the tensor."""
    if not is_sharded(like):
        return tensor
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(tensor.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def resident_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the modules' parameters and buffers that this process holds (its shards, when
    sharded), each storage counted once."""
    storages = {}
    for tensor in itertools.chain.from_iterable(itertools.chain(m.parameters(), m.buffers()) for m in modules):
        local = tensor.to_local() if is_sharded(tensor) else tensor
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor whole, on the CPU, by name (on every process; a collective when sharded)."""
    return {n: full(p.detach()).contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[nn.Module]:
    """The adapter's parameters whole for the block (to save it): every sharded parameter that
    trains or belongs to an adapter module is swapped for its full tensor, and back after.
    A collective: every process enters it."""
    from peftkit.protocol import adapter_parameters

    if not any(is_sharded(p) for p in model.parameters()):
        yield model
        return
    adapter = {id(p) for p in adapter_parameters(model).values()}
    swapped = []
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and is_sharded(param) and (param.requires_grad or id(param) in adapter):
                module._parameters[name] = nn.Parameter(full(param.detach()), requires_grad=param.requires_grad)
                swapped.append((module, name, param))
    try:
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param
