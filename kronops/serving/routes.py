"""Which adapter each batch row uses, and the token grouping the serving ops take.

A ``Route`` holds one bank slot per batch row (-1: the base model). A layer's input
(rows, ..., in) may have more rows than the route when a model repeats each batch row
(beam search, ``num_return_sequences``: row r belongs to route entry r // k) or folds the
sequence into the rows (also row-major, so the same rule holds). For each layer the route
groups that input's tokens by the layer's members (the adapters loaded on it, in order):
built once per input shape and member list, reused by every layer that shares them and by
every decode step of the same shape.
"""
from dataclasses import dataclass

import torch

ROUTE_TILE = 64  # tokens per run of a tile table: one kernel program's work


@dataclass(frozen=True)
class TokenGroups:
    """tokens: (T,) int64 rows of the flattened input, member 0's first; offsets: the
    (len(members) + 1) boundaries of each member's run in ``tokens``; starts: per member its
    first row when its rows are consecutive, else -1 (host ints)."""
    tokens: torch.Tensor
    offsets: list[int]
    starts: list[int]


def tile_table(offsets: list[int], columns: list[tuple[int, int]],
               device: torch.device) -> torch.Tensor:
    """(n_tiles, 4) int64 rows [start, stop, *columns[p]]: member p's run of ``tokens`` cut
    into pieces of at most ROUTE_TILE (the kernels' tile table; ``columns`` is per member
    what its kernel needs: its factor index, or its Δ segment)."""
    rows = [(start, min(start + ROUTE_TILE, hi), *columns[p])
            for p, (lo, hi) in enumerate(zip(offsets, offsets[1:]))
            for start in range(lo, hi, ROUTE_TILE)]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 4).to(device)


class Route:
    """slots: (batch,) int64 bank slots, -1 for the base model (on the host)."""

    def __init__(self, slots: torch.Tensor):
        self.slots = slots
        self._groups, self._tiles = {}, {}

    def rows_per_entry(self, rows: int) -> int:
        """How many input rows each route entry covers; RuntimeError when ``rows`` is not a
        multiple of the route's length."""
        if rows == 0 or rows % len(self.slots):
            raise RuntimeError(f"an adapted layer got an input of {rows} rows for a route of "
                               f"{len(self.slots)} batch rows: the rows must be the batch "
                               "(or each batch row repeated k times, as beam search does)")
        return rows // len(self.slots)

    def groups(self, rows: int, per_row: int, members: tuple[int, ...],
               device: torch.device) -> TokenGroups:
        """The tokens of an input of ``rows`` rows of ``per_row`` tokens each, grouped by
        ``members`` (bank slots)."""
        key = (rows, per_row, members, device)
        if key not in self._groups:
            slots = self.slots.repeat_interleave(self.rows_per_entry(rows))
            step = torch.arange(per_row)
            runs = [((slots == slot).nonzero().flatten()[:, None] * per_row + step).flatten()
                    for slot in members]
            offsets, starts = [0], []
            for run in runs:
                offsets.append(offsets[-1] + run.numel())
                consecutive = run.numel() and int(run[-1]) - int(run[0]) == run.numel() - 1
                starts.append(int(run[0]) if consecutive else -1)
            tokens = torch.cat(runs) if runs else torch.empty(0, dtype=torch.int64)
            self._groups[key] = TokenGroups(tokens.to(device), offsets, starts)
        return self._groups[key]

    def tiles(self, groups: TokenGroups, columns: tuple[tuple[int, int], ...],
              device: torch.device) -> torch.Tensor:
        """``tile_table`` of ``groups`` with per-member ``columns``, built once."""
        key = (id(groups), columns)
        if key not in self._tiles:
            self._tiles[key] = tile_table(groups.offsets, list(columns), device)
        return self._tiles[key]
