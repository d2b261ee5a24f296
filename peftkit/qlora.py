"""QLoRA (Dettmers et al., 2023): a frozen base quantised to 4-bit NF4 with double
quantisation, and LoRA on top of every linear layer, trained through the 4-bit weights.

In peftkit QLoRA is LoRA with `quantize: nf4` (preset `qlora`): `apply_adapter` quantises the
targeted layers it finds in full precision, and `load_model(name, quantize="nf4")` quantises
every linear layer but the output head up front. A trained QLoRA adapter is a plain LoRA
adapter in peft's format; its config notes the 4-bit base so loaders can rebuild it.
"""

import logging
import math

from torch import nn
from transformers.pytorch_utils import Conv1D

from peftkit.errors import AdapterError
from peftkit.nf4 import Linear4bit, quantize_nf4
from peftkit.targets import kept_in_full_precision, quantizable_names, replace_module

logger = logging.getLogger(__name__)


def will_quantize(model: nn.Module, name: str, blocksize: int = 64, log: bool = False) -> bool:
    """Whether `quantize_layers` turns this layer into 4-bit (see there); an error for a layer it cannot."""
    layer = model.get_submodule(name)
    if isinstance(layer, Linear4bit):
        return False
    if kept_in_full_precision(model, name):
        if log:
            logger.info("%s: %s keeps this layer in full precision (_keep_in_fp32_modules); not quantised",
                        name, type(model).__name__)
        return False
    if not isinstance(layer, (nn.Linear, Conv1D)):
        raise AdapterError(f"cannot quantise {name!r}: it is a {type(layer).__name__}; NF4 quantises nn.Linear "
                           f"and Conv1D layers: narrow target_modules to those")
    if layer.weight.numel() % blocksize:
        if log:
            logger.warning("%s: %d weights are not a multiple of the block size %d; left unquantised",
                           name, layer.weight.numel(), blocksize)
        return False
    return True


def quantize_layers(model: nn.Module, names: list[str], blocksize: int = 64, double_quant: bool = True) -> int:
    """Replace the named `nn.Linear` (or GPT-2 `Conv1D`) layers by `Linear4bit`; returns how many were quantised.

    A Conv1D's (in, out) weight is quantised transposed, as (out, in), as transformers' bitsandbytes
    loader does, so the 4-bit layer computes the same x @ W + b. A layer whose weight is not a
    whole number of blocks stays in full precision, with a warning naming it (bitsandbytes would
    pad the last block; a skipped layer keeps exact weights); so does one the model keeps in full
    precision (T5's `wo`), as transformers' bitsandbytes loader leaves it.
    """
    quantized = 0
    for name in names:
        layer = model.get_submodule(name)
        if not will_quantize(model, name, blocksize, log=True):
            continue
        if isinstance(layer, Conv1D):
            packed, state = quantize_nf4(layer.weight.T.contiguous(), blocksize=blocksize, double_quant=double_quant)
            quantized_layer = Linear4bit(packed, state, layer.bias)
        else:
            quantized_layer = Linear4bit.from_linear(layer, blocksize=blocksize, double_quant=double_quant)
        replace_module(model, name, quantized_layer)
        quantized += 1
    return quantized


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True) -> nn.Module:
    """Quantise every linear layer except the output head, in place (as bitsandbytes' loader does)."""
    count = quantize_layers(model, quantizable_names(model), blocksize, double_quant)
    logger.info("quantised %d linear layers to NF4 (block %d, double quant %s)", count, blocksize, double_quant)
    return model


def weight_memory(model: nn.Module) -> dict[str, float]:
    """Bytes and bits per parameter of the 4-bit layers: packed codes plus every quantisation state
    tensor (block absmax codes, nested absmax, offset, code table), each storage counted once."""
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    storages = {buf.untyped_storage().data_ptr(): buf.untyped_storage().nbytes()
                for layer in layers for name, buf in layer.named_buffers() if buf is not None}
    params = sum(math.prod(m.weight_shape) for m in layers)
    total = sum(storages.values())
    return {"layers": len(layers), "parameters": params, "bytes": total,
            "bits_per_parameter": 8 * total / params if params else float("nan")}
