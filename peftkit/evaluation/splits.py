"""Deterministic splits and in-context example draws, shared with the training pipeline.

Every split depends only on the data and a seed (SHA-256, or Python's `random.Random`, both
stable across platforms and versions), so training and evaluation agree without split files.
"""

import hashlib
import random
from collections.abc import Sequence
from typing import TypeVar

from peftkit.errors import ConfigError

T = TypeVar("T")


def split_heldout(n: int, fraction: float = 0.05, seed: int = 42) -> tuple[list[int], list[int]]:
    """Split `range(n)` into (train, held-out) index lists, each sorted.

    Args:
        n: number of examples.
        fraction: share held out; at least one example is held out.
        seed: the shuffle's seed.

    Returns:
        (train indices, held-out indices), disjoint, together `range(n)`.

    Raises:
        ConfigError: n < 2, or a fraction outside (0, 1).
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"held-out fraction must be between 0 and 1, got {fraction!r}")
    if n < 2:
        raise ConfigError(f"cannot hold out part of {n} example(s): use a data file with at least 2")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(n - 1, max(1, round(n * fraction)))
    return sorted(order[k:]), sorted(order[:k])


def split_e2e(rows: Sequence[dict[str, str]], heldout_fraction: float = 0.2,
              seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Split E2E rows by meaning representation, never by row, so no `mr` is on both sides.

    An `mr` is held out when the first 8 bytes of SHA-256 of `"{seed}:{mr}"`, read as a fraction of
    2**64, fall below `heldout_fraction`: the split does not depend on row order or on which other
    mrs are in the file; training (`peftkit.data.e2e_split`) uses the same `mr_is_heldout`. The held-out share of mrs is therefore close to, not exactly, the fraction.

    Args:
        rows: `{mr, ref}` rows, as `read_e2e` returns them.
        heldout_fraction: expected share of distinct `mr`s held out.
        seed: mixed into the hash; another seed gives another split.

    Returns:
        (training rows, held-out rows), each in file order.
    """
    if not 0 < heldout_fraction < 1:
        raise ConfigError(f"held-out fraction must be between 0 and 1, got {heldout_fraction!r}")
    return ([r for r in rows if not mr_is_heldout(r["mr"], heldout_fraction, seed)],
            [r for r in rows if mr_is_heldout(r["mr"], heldout_fraction, seed)])


def mr_is_heldout(mr: str, heldout_fraction: float, seed: int | str = 0) -> bool:
    """Whether an E2E meaning representation is on the held-out side (see `split_e2e`); a string
    seed salts another split apart from it (a study's dev split, `peftkit.selection.split_dev`)."""
    digest = hashlib.sha256(f"{seed}:{mr}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def group_references(rows: Sequence[dict[str, str]]) -> list[tuple[str, list[str]]]:
    """(mr, all its references) in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for row in rows:
        groups.setdefault(row["mr"], []).append(row["ref"])
    return list(groups.items())


def draw(items: Sequence[T], k: int, seed: int) -> list[T]:
    """`k` items drawn without replacement with a fixed seed."""
    if k > len(items):
        raise ConfigError(f"cannot draw {k} in-context examples from {len(items)}: use fewer shots")
    return random.Random(seed).sample(list(items), k)


def draw_balanced(items: Sequence[T], labels: Sequence[int], k: int, seed: int) -> list[T]:
    """`k` items with labels as equal in number as `k` allows, in a seeded order."""
    rng = random.Random(seed)
    classes = sorted(set(labels))
    per_class = {c: k // len(classes) for c in classes}
    for c in rng.sample(classes, k % len(classes)):
        per_class[c] += 1
    picked: list[T] = []
    for c in classes:
        pool = [item for item, label in zip(items, labels) if label == c]
        if per_class[c] > len(pool):
            raise ConfigError(f"cannot draw {per_class[c]} examples of label {c} from {len(pool)}: use fewer shots")
        picked += rng.sample(pool, per_class[c])
    rng.shuffle(picked)
    return picked
