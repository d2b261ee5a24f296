"""Batching of token-id lists: length-sorted batches, padding, positions that follow the mask.

Sorting by length keeps padding small; the longest batch comes first, so an out-of-memory error
shows at once rather than at the end. Left padding puts every sequence's last token in the last
column, which is what `generate` and last-position scoring need.
"""

from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm


def sorted_batches(sequences: Sequence[Sequence[int]], batch_size: int, desc: str | None = None,
                   progress: bool = True) -> Iterator[tuple[int, list[int]]]:
    """(batch number, indices into `sequences`), longest sequences first, with a progress bar.

    The bar shows only on a terminal (tqdm's `disable=None`) or not at all with `progress=False`.
    """
    order = sorted(range(len(sequences)), key=lambda i: (-len(sequences[i]), i))
    starts = range(0, len(order), batch_size)
    bar = tqdm(starts, desc=desc, unit="batch", leave=False, disable=None if progress else True)
    for number, start in enumerate(bar):
        yield number, order[start:start + batch_size]


def pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device,
        side: str = "left") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded (input_ids, attention_mask, position_ids), each (batch, longest); `side` is left or right."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            columns = slice(longest - len(seq), None) if side == "left" else slice(0, len(seq))
            ids[row, columns] = torch.tensor(seq, dtype=torch.long)
            mask[row, columns] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens at 0, 1, ... as in an unpadded row
    return ids.to(device), mask.to(device), positions.to(device)
