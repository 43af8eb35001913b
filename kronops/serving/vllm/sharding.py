"""Tensor parallelism for kronops updates: the update of a whole (out, in) weight cut to the part
one rank's layer computes, exactly.

A rank's column-parallel layer (q/k/v, gate/up, ...) computes some output rows of the whole
layer, ``rows`` (int64: its output row p is the whole layer's row rows[p]); a row-parallel
layer (o_proj, down_proj) takes input columns ``cols`` and its partial outputs are summed
across ranks. ``shard(update, rows, cols)`` gives the update of that part (None: whole):

- ``KronUpdate`` Δ = A⊗B, A (a1, a2), B (b1, b2); row i = i_a·b1 + i_b. Rows made of whole
  blocks of b1 (each starting at a multiple of b1) are A's rows i_a ⊗ B; rows inside one
  block i_a are A[i_a] ⊗ B's rows i_b. Columns likewise with b2. Any other cut is no
  Kronecker product: ``ShardError`` names the sizes.
- ``SparseUpdate`` rows side (Δ (|R|, in)): the rows part keeps R ∩ rows, renumbered in the
  part, with their Δ rows; the columns part keeps R and Δ's columns cols. Columns side
  (Δ (out, |C|)) the other way round.

None when the part holds nothing of the update (an S²FT selection outside it).
"""
import dataclasses

import torch

from ...adapters.methods.updates import KronUpdate, SparseUpdate
from ...s2ft.selection import Selection


class ShardError(ValueError):
    """An update that cannot be cut to a rank's part as the same kind of update."""


def _kron_part(a: torch.Tensor, b: torch.Tensor, index: torch.Tensor, dim: int):
    """(A', B') with A'⊗B' = (A⊗B) restricted to ``index`` along ``dim`` (0 rows, 1 cols)."""
    n = b.shape[dim]
    if index.numel() % n == 0:
        blocks = index.view(-1, n)
        first = blocks[:, 0]
        if bool((first % n == 0).all()) and torch.equal(
                blocks, first[:, None] + torch.arange(n, device=index.device)):
            return a.index_select(dim, (first // n).to(a.device)), b
    outer = index // n
    if bool((outer == outer[0]).all()):
        return (a.narrow(dim, int(outer[0]), 1),
                b.index_select(dim, (index % n).to(b.device)))
    side = ("rows", "row") if dim == 0 else ("columns", "column")
    raise ShardError(
        f"this rank's {index.numel()} {side[0]} of the {a.shape[dim] * n} (from {side[1]} "
        f"{int(index[0])}) are neither whole blocks of B's {n} {side[0]} nor inside one block "
        f"(A {tuple(a.shape)}, B {tuple(b.shape)}), so they are no Kronecker product")


def _sparse_part(update: SparseUpdate, index: torch.Tensor, side: str) -> SparseUpdate | None:
    """``update`` restricted to ``index`` (of ``side``: "rows" or "cols")."""
    selection, delta = update.selection, update.delta
    dim = 0 if side == "rows" else 1
    if selection.side != side:  # the selected side is whole here: cut Δ along this one
        return SparseUpdate(selection, delta.index_select(dim, index.to(delta.device)))
    chosen = selection.indices("cpu")
    position = torch.full((selection.size,), -1, dtype=torch.int64)
    position[chosen] = torch.arange(chosen.numel())
    found = position[index]
    kept = (found >= 0).nonzero().flatten()
    if kept.numel() == 0:
        return None
    part = Selection(side, kept, size=index.numel()).to(selection.device)
    return SparseUpdate(part, delta.index_select(dim, found[kept].to(delta.device)))


def shard(update, rows: torch.Tensor | None, cols: torch.Tensor | None):
    """``update`` (KronUpdate or SparseUpdate of a whole weight) cut to output ``rows`` and
    input ``cols`` (int64 index tensors on the CPU; None: all); None when nothing is left.
    ShardError when a Kronecker update cannot be cut (module docstring)."""
    for dim, index in ((0, rows), (1, cols)):
        if index is None:
            continue
        if isinstance(update, KronUpdate):
            a, b = _kron_part(update.a, update.b, index, dim)
            update = dataclasses.replace(update, a=a, b=b)
        else:
            update = _sparse_part(update, index, "rows" if dim == 0 else "cols")
            if update is None:
                return None
    return update
