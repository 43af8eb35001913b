"""Which adapter each batch row uses, and the token grouping the serving ops take.

A ``Route`` holds one bank slot per name and ``rows_per_name`` k, the batch rows each name
covers, given by the caller (1: one name per batch row; k for beam search or
``num_return_sequences``, which repeat each row k times: row r belongs to entry r // k).
The rows a model's batch or an adapted layer's input (rows, ..., in) may have are exactly
one per entry or k per entry (an encoder runs once per prompt, its decoder once per beam),
so a list of another length is refused, never read as beams. A 2-D layer input may also
fold the sequence into its rows (OPT's FFN: (batch x seq, in)), row-major, so row r
belongs to entry r // (rows / entries). For each layer the route
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
    """slots: (entries,) int64 bank slots, -1 for the base model (on the host);
    rows_per_name: the batch rows each entry covers (see the module docstring)."""

    def __init__(self, slots: torch.Tensor, rows_per_name: int = 1):
        self.slots, self.rows_per_name = slots, rows_per_name
        self._groups, self._tiles = {}, {}

    def check_rows(self, rows: int, folded: bool = False) -> None:
        """``rows`` (a model's batch, or an adapted layer's input rows; ``folded``: a 2-D
        input, which may fold the sequence into its rows) fit the route; else ValueError
        naming both lengths."""
        n, k = len(self.slots), self.rows_per_name
        if rows in (n, n * k) or (folded and rows and rows % n == 0):
            return
        expected = f"{n}" if k == 1 else f"{n} (one per name) or {n * k} ({k} per name)"
        raise ValueError(f"route of {n} names for a batch of {rows} rows: the batch must have "
                         f"{expected} rows; give one name per batch row, or route(names, "
                         "rows_per_name=k) when each name covers k consecutive rows (beam "
                         "search, num_return_sequences)")

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
