"""Combine LoRA adapters into one, layer by layer: the math of peft's `add_weighted_adapter`.

Each source i gives a layer its factors A_i (r_i, in), B_i (out, r_i) and scale s_i (alpha/r, or
alpha/sqrt(r) with rsLoRA). With weights w_i the new layer holds (A, B) whose own scale is 1:

    linear, ties, dare_*, magnitude_prune:  merge_i(sqrt|w_i s_i| sign(w_i s_i) A_i), merge_i(sqrt|w_i s_i| B_i)
    cat:  A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1, B_2, ...]          (exact: B A = sum w_i s_i B_i A_i)
    svd family:  B A = truncated SVD of merge_i(w_i * s_i B_i A_i)

merge is task arithmetic (a weighted sum), TIES (Yadav et al., 2023: keep the top-`density`
magnitudes, elect a sign, average the agreeing entries), DARE (Yu et al., 2023: keep each entry
with probability `density`, rescale by 1/density) with a linear or TIES merge, or magnitude pruning.
With a single source every combination is `linear`, as in peft.

Note: the new adapter's config, as peft builds it. peft copies the first source's config and sets
`r` (see `combined_rank`), `lora_alpha = r` (`combined_alpha`), `target_modules` (see
`combined_targets`) and empty `rank_pattern` / `alpha_pattern`; everything else, `use_rslora`
and `use_dora` included, is the first source's. So with `use_rslora` the new layers scale by
r / sqrt(r) = sqrt(r), not 1: peft's merged rsLoRA adapter is sqrt(r) times the combination.
peft does not reject DoRA sources (it combines A and B and leaves the new magnitude vector at
its initial value); `check_sources` rejects them. peft silently does nothing when the new name
already exists.

Note: random draws. DARE calls `torch.bernoulli` (the default generator of the tensors' device)
once per present source and factor: per layer all A_i, then all B_i (svd variants: one draw per
delta B_i A_i), layers in `model.named_modules()` order; `density == 1` draws nothing. peft first
initialises the new adapter's weights, which also draws, so seed after that to match it.
"""

import math

import torch

from peftkit.errors import AdapterError

COMBINATIONS: tuple[str, ...] = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd",
                                 "dare_ties", "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
EQUAL_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # A and B merged separately
SIGN_METHODS = ("total", "frequency")

Factors = tuple[torch.Tensor, torch.Tensor, float]


def _effective(n_sources: int, combination: str) -> str:
    """peft merges a single source with `linear`, whatever the combination asked for."""
    if combination not in COMBINATIONS:
        raise AdapterError(f"unknown combination {combination!r}: use one of {', '.join(COMBINATIONS)}")
    return "linear" if n_sources == 1 else combination


def combined_rank(ranks: list[int], combination: str, svd_rank: int | None = None) -> int:
    """The new adapter's rank by peft's rules.

    Args:
        ranks: each source's rank (with a rank pattern, its largest rank), in source order.
        combination: one of `COMBINATIONS`.
        svd_rank: the svd family's rank; None (or 0, as in peft) means max(ranks).

    Returns:
        The equal rank (linear, ties, dare_*, magnitude_prune; also any single source), the sum
        (cat), or svd_rank or max(ranks) (svd family).

    Raises:
        AdapterError: no ranks, an unknown combination, unequal ranks where they must be equal,
            or a negative svd_rank.
    """
    if not ranks:
        raise AdapterError("no source adapters to combine: pass at least one adapter")
    combination = _effective(len(ranks), combination)
    if combination in EQUAL_RANK:
        if len(set(ranks)) != 1:
            raise AdapterError(f"combination {combination!r} needs equal ranks, got {ranks}: use 'cat' or 'svd'")
        return ranks[0]
    if combination == "cat":
        return sum(ranks)
    if svd_rank is not None and svd_rank < 0:
        raise AdapterError(f"svd_rank must be positive, got {svd_rank}: pass a rank >= 1 or None for max(ranks)")
    return svd_rank or max(ranks)


def combined_alpha(new_rank: int) -> int:
    """The new adapter's alpha as peft sets it: its rank, so its scale is 1 (sqrt(r) under rsLoRA)."""
    return new_rank


def combined_targets(targets: list[list[str] | set[str] | str]) -> list[str] | str:
    """The new adapter's target modules by peft's rule (the same for every combination).

    Args:
        targets: each source's target modules: a list/set of names, or one regex string.

    Returns:
        The sorted union of the name lists (peft keeps a set), or "(re_1)|(re_2)|...".

    Raises:
        AdapterError: no sources, or names mixed with regex strings.
    """
    if not targets:
        raise AdapterError("no source adapters to combine: pass at least one adapter")
    regexes = [isinstance(t, str) for t in targets]
    if all(regexes):
        return "|".join(f"({t})" for t in targets)
    if any(regexes):
        raise AdapterError("target_modules mix module lists and regex strings: give every source the same kind")
    return sorted(set().union(*targets))


def check_sources(names: list[str], weights: list[float], dora: list[bool]) -> None:
    """Reject what `combine_layer` cannot combine faithfully.

    Args:
        names: the source adapters' names.
        weights: one weight per source.
        dora: whether each source is a DoRA adapter.

    Raises:
        AdapterError: no sources, a weight count that differs (peft would silently drop the
            extra sources), or a DoRA source (its magnitude vector cannot be combined).
    """
    if not names:
        raise AdapterError("no source adapters to combine: pass at least one adapter")
    if len(weights) != len(names):
        raise AdapterError(f"{len(names)} adapters but {len(weights)} weights: pass one weight per adapter")
    dora_names = [name for name, is_dora in zip(names, dora) if is_dora]
    if dora_names:
        raise AdapterError(f"adapter {dora_names[0]!r} is DoRA (its magnitude cannot be combined): use LoRA adapters")


def check_options(n_sources: int, combination: str, density: float | None, majority_sign_method: str = "total",
                  svd_clamp: float | None = None) -> None:
    """The one-line errors `combine_layer` would raise, before any layer is touched."""
    _check_options(_effective(n_sources, combination), density, majority_sign_method, svd_clamp)


def _check_options(combination: str, density: float | None, majority_sign_method: str,
                   svd_clamp: float | None) -> None:
    """One-line errors for the options the effective `combination` uses (peft fails late, or not at all)."""
    if combination not in ("linear", "cat", "svd") and (density is None or not 0 < density <= 1):
        raise AdapterError(f"combination {combination!r} needs density in (0, 1], got {density}: "
                           "pass the fraction of entries to keep, e.g. density=0.5")
    if "ties" in combination and majority_sign_method not in SIGN_METHODS:
        raise AdapterError(f"unknown majority_sign_method {majority_sign_method!r}: use 'total' or 'frequency'")
    if combination.endswith("svd") and svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise AdapterError(f"svd_clamp is a quantile, got {svd_clamp}: pass a value in [0, 1] or None")


def _prune(tensor: torch.Tensor, density: float, method: str) -> torch.Tensor:
    """Keep the top-`density` magnitudes (ties, magnitude_prune) or a random `density` fraction,
    rescaled by 1/density (dare); `density == 1` keeps all and draws nothing. Same shape."""
    if density >= 1:
        return tensor
    if method.startswith("dare"):
        return tensor * torch.bernoulli(torch.full_like(input=tensor, fill_value=density)) / density
    mask = torch.zeros_like(tensor).reshape(-1)
    top_k = torch.topk(tensor.abs().reshape(-1), k=int(density * tensor.numel()), largest=True)
    mask[top_k[1]] = 1
    return tensor * mask.reshape(tensor.shape)


def _merge(tensors: list[torch.Tensor], weights: torch.Tensor, method: str, density: float | None,
           majority_sign_method: str) -> torch.Tensor:
    """peft's task_arithmetic / ties / dare_linear / dare_ties / magnitude_prune of n tensors
    (rows, cols) with weights (n,) into one (rows, cols); `method` drops the `_svd` suffix ("svd": a sum)."""
    if method not in ("linear", "svd"):
        tensors = [_prune(t, density, method) for t in tensors]
    stacked = torch.stack(tensors, dim=0)  # (n, rows, cols)
    weighted = stacked * weights.view(weights.shape + (1,) * (stacked.dim() - 1))
    if "ties" not in method:
        return weighted.sum(dim=0)
    sign = stacked.sign()  # TIES sign election on the pruned, unweighted tensors
    magnitude = stacked.sum(dim=0) if majority_sign_method == "total" else sign.sum(dim=0)
    agree = sign == torch.where(magnitude >= 0, 1, -1)
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _delta(A: torch.Tensor, B: torch.Tensor, scale: float, fan_in_fan_out: bool) -> torch.Tensor:
    """s B A (out, in), or its transpose (in, out) in `fan_in_fan_out` layout, as peft's
    `get_delta_weight` computes it (fp32 matmul for half precision on CPU)."""
    half_on_cpu = B.device.type == "cpu" and B.dtype in (torch.float16, torch.bfloat16)
    product = B.float() @ A.float() if half_on_cpu else B @ A
    delta = (product.T if fan_in_fan_out else product) * scale
    return delta.to(B.dtype) if half_on_cpu else delta


def _cat(present: list[tuple[Factors, float]], new_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack w_i s_i A_i and B_i along the rank, zero-padded to `new_rank` (sources absent here)."""
    (A0, B0, _), _ = present[0]
    A_cat = torch.cat([A * w * s for (A, _, s), w in present], dim=0)  # (sum r_i, in)
    B_cat = torch.cat([B for (_, B, _), _ in present], dim=1)  # (out, sum r_i)
    A_new, B_new = A0.new_zeros(new_rank, A0.shape[1]), B0.new_zeros(B0.shape[0], new_rank)
    A_new[: A_cat.shape[0]], B_new[:, : B_cat.shape[1]] = A_cat, B_cat
    return A_new, B_new


def _factorwise(present: list[tuple[Factors, float]], combination: str, density: float | None,
                majority_sign_method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the A_i, then the B_i (that order matters for DARE's draws), each with sqrt|w_i s_i|."""
    (A0, B0, _), _ = present[0]
    scaled = [w * s for (_, _, s), w in present]
    # the sign goes on A only, so B A keeps sign(w s)
    w_A = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in scaled]).to(A0.device)
    w_B = torch.tensor([math.sqrt(abs(x)) for x in scaled]).to(B0.device)
    A_new = _merge([A for (A, _, _), _ in present], w_A, combination, density, majority_sign_method)
    B_new = _merge([B for (_, B, _), _ in present], w_B, combination, density, majority_sign_method)
    return A_new.to(A0.dtype), B_new.to(A0.dtype)


def _svd(present: list[tuple[Factors, float]], combination: str, new_rank: int, density: float | None,
         majority_sign_method: str, clamp: float | None, full_matrices: bool, driver: str | None,
         fan_in_fan_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the deltas w_i s_i B_i A_i, then keep the top `new_rank` singular directions:
    A = Vh (r_new, in), B = U S (out, r_new), both clamped to a quantile if `clamp` is set."""
    deltas = [_delta(A, B, s, fan_in_fan_out) for (A, B, s), _ in present]
    weights = torch.tensor([w for _, w in present]).to(deltas[0].device)
    delta = _merge(deltas, weights, combination.removesuffix("_svd"), density, majority_sign_method)
    U, S, Vh = torch.linalg.svd(delta.T if fan_in_fan_out else delta, full_matrices=full_matrices, driver=driver)
    U, Vh = U[:, :new_rank] @ torch.diag(S[:new_rank]), Vh[:new_rank, :]  # (out, r_new), (r_new, in)
    if clamp is not None:
        high = torch.quantile(torch.cat([U.flatten(), Vh.flatten()]), clamp)
        U, Vh = U.clamp(-high, high), Vh.clamp(-high, high)
    return Vh, U


@torch.no_grad()
def combine_layer(factors: list[Factors | None], weights: list[float], combination: str,
                  density: float | None = None, majority_sign_method: str = "total", svd_rank: int | None = None,
                  svd_clamp: float | None = None, svd_full_matrices: bool = True, svd_driver: str | None = None,
                  fan_in_fan_out: bool = False, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's combined factors, with peft's values, dtypes and random draws.

    Args:
        factors: per source, (A_i (r_i, in), B_i (out, r_i), scale_i), or None where that source
            does not adapt this layer.
        weights: one weight per source (negative subtracts).
        combination: one of `COMBINATIONS`.
        density: fraction of entries kept, in (0, 1]; for ties, dare_*, magnitude_prune (+ _svd).
        majority_sign_method: "total" or "frequency", TIES's sign election (ties*, dare_ties*).
        svd_rank, svd_clamp, svd_full_matrices, svd_driver: the svd family's rank (see
            `combined_rank`), quantile clamp of the factors, and `torch.linalg.svd` options.
        fan_in_fan_out: the layer stores its weight as (in, out) (GPT-2 Conv1D; pass True for
            embeddings too); changes only DARE's draws in the svd family.
        rank: the new adapter's rank, `combined_rank` over all sources; required when a source is None.

    Returns:
        (A (r_new, in), B (out, r_new)), for a new adapter whose scale is 1.

    Raises:
        AdapterError: mismatched lengths, no source on this layer, a missing `rank`, or an
            invalid combination, rank, density, majority_sign_method or svd_clamp.
    """
    if len(factors) != len(weights):
        raise AdapterError(f"{len(factors)} sources but {len(weights)} weights: pass one weight per source")
    combination = _effective(len(factors), combination)
    present = [(f, w) for f, w in zip(factors, weights) if f is not None]
    if not present:
        raise AdapterError("no source adapts this layer: combine only layers some source adapts")
    if rank is None and len(present) < len(factors):
        raise AdapterError("a source does not adapt this layer: pass rank=combined_rank(all source ranks, ...)")
    _check_options(combination, density, majority_sign_method, svd_clamp)
    new_rank = rank or combined_rank([A.shape[0] for (A, _, _), _ in present], combination, svd_rank)
    if combination == "cat":
        return _cat(present, new_rank)
    if combination in EQUAL_RANK:
        return _factorwise(present, combination, density, majority_sign_method)
    return _svd(present, combination, new_rank, density, majority_sign_method, svd_clamp, svd_full_matrices,
                svd_driver, fan_in_fan_out)
