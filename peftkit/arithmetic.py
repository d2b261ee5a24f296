"""`combine_adapters`: several named LoRA adapters on one model combined into a new one, as peft's
`add_weighted_adapter` does (the per-layer math is `peftkit.combine`).

The new adapter is added beside its sources (they stay), frozen and inactive until
`set_adapter` chooses it. Its rank follows peft's rules (`combine.combined_rank`), its targets
are every layer a source adapts, and its scale is 1 (alpha = r). One difference from peft, on
purpose: peft copies `use_rslora` from the first source, so a combination of rsLoRA adapters
scales by sqrt(r) and comes out sqrt(r) times too large; ours sets plain LoRA with alpha = r,
so B A is the combination whatever the sources' scaling.
"""

from collections.abc import Sequence
from dataclasses import replace

import torch
from torch import nn

from peftkit.combine import check_options, check_sources, combine_layer, combined_rank
from peftkit.errors import AdapterError
from peftkit.methods.lora import LoRAConfig, LoRALinear
from peftkit.named import check_name, check_new_name, delete_adapter, layers_of
from peftkit.slots import containers, view


def combine_adapters(model: nn.Module, names: Sequence[str], weights: Sequence[float], combination: str = "linear",
                     density: float | None = None, name: str = "combined", *, majority_sign_method: str = "total",
                     svd_rank: int | None = None, svd_clamp: float | None = None, overwrite: bool = False) -> nn.Module:
    """Add adapter `name`, the weighted combination of the LoRA adapters `names`.

    Args:
        model: a model carrying the source adapters (`load_adapter(..., name=)`).
        names: the source adapters.
        weights: one weight per source (negative weights subtract a task).
        combination: linear, cat, svd, ties, dare_linear, dare_ties or magnitude_prune (and
            the `_svd` variants of the last four, as peft has them).
        density: the fraction of entries TIES, DARE and magnitude pruning keep.
        name: the new adapter's name.
        majority_sign_method: TIES' sign election, `total` or `frequency`.
        svd_rank, svd_clamp: the svd family's rank (default: the largest source rank) and clamp quantile.
        overwrite: replace an existing adapter called `name`.

    Returns:
        The model, with the new adapter beside the sources. DARE draws its masks from torch's
        default generator after the new adapter's initialisation, as peft does: seed before
        calling for a reproducible combination.

    Raises:
        AdapterError: an unknown source, mismatched weights, a source that is not LoRA (or is
            DoRA), unequal ranks for an equal-rank combination, a missing density, or a name
            that exists without `overwrite`.
    """
    from peftkit.api import apply_adapter

    names, weights = list(names), list(weights)
    if not names:
        raise AdapterError("combine_adapters needs at least one source adapter name")
    for source in names:
        check_name(model, source)
    if len(set(names)) != len(names):
        raise AdapterError(f"combine_adapters got a source twice ({', '.join(names)}): list each adapter once")
    if name in names:
        raise AdapterError(f"the combination's name {name!r} is one of its sources: choose another name")
    check_new_name(model, name, overwrite)
    configs = [model.peftkit_adapters[source] for source in names]
    for source, cfg in zip(names, configs):
        if not isinstance(cfg, LoRAConfig):
            raise AdapterError(f"adapter {source!r} is {cfg.method}: combine_adapters combines LoRA adapters (as peft's "
                               f"add_weighted_adapter does)")
    check_sources(names, weights, [cfg.dora for cfg in configs])
    check_options(len(names), combination, density, majority_sign_method, svd_clamp)
    rank = combined_rank([cfg.r for cfg in configs], combination, svd_rank)
    targets = set()
    for source in names:
        with view(model, source):
            targets |= {path.rsplit(".", 1)[-1] for path in layers_of(model)}
    new = replace(configs[0], r=rank, alpha=float(rank), rslora=False, init="default", target_modules=sorted(targets))
    apply_adapter(model, new, name=name, overwrite=overwrite)
    try:
        _fill(model, names, weights, name, rank, combination=combination, density=density,
              majority_sign_method=majority_sign_method, svd_rank=svd_rank, svd_clamp=svd_clamp)
    except Exception:
        delete_adapter(model, name)
        raise
    return model


@torch.no_grad()
def _fill(model: nn.Module, names: list[str], weights: list[float], name: str, rank: int, **options) -> None:
    """Each layer of the new adapter from its sources' factors, in peft's layer order (DARE's draws)."""
    for slot in containers(model).values():
        if name not in slot.layers:
            continue
        target: LoRALinear = slot.layers[name]
        factors = [(layer.lora_A.weight, layer.lora_B.weight, layer.scale) if isinstance(layer, LoRALinear) else None
                   for layer in (slot.layers[s] if s in slot.layers else None for s in names)]
        weight_a, weight_b = combine_layer(factors, weights, fan_in_fan_out=target.fan_in_fan_out, rank=rank, **options)
        target.lora_A.weight.copy_(weight_a)
        target.lora_B.weight.copy_(weight_b)
