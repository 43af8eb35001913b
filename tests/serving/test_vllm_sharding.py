"""kronops.serving.vllm.sharding without vLLM: KronA/LoKr and S²FT updates cut to a rank's
part of a tensor-parallel layer, simulated. A column-parallel layer's ranks compute blocks of
output rows (a fused gate_up rank two blocks, a K/V slice under GQA replication a block shared
by several ranks): each rank's update gives exactly those rows of the whole layer's output. A
row-parallel layer's ranks take blocks of input columns: their outputs sum to the whole
layer's. Cuts through blocks of B are refused naming the sizes."""
import pytest
import torch
from models import materialised

from kronops.adapters.methods.updates import KronUpdate, SparseUpdate
from kronops.s2ft.selection import Selection
from kronops.serving.vllm.sharding import ShardError, shard

DTYPE = torch.float64


def kron(a_shape, b_shape, seed) -> KronUpdate:
    g = torch.Generator().manual_seed(seed)
    return KronUpdate(a=torch.randn(a_shape, generator=g, dtype=DTYPE),
                      b=torch.randn(b_shape, generator=g, dtype=DTYPE))


def sparse(side, shape, count, seed) -> SparseUpdate:
    g = torch.Generator().manual_seed(seed)
    size = shape[0 if side == "rows" else 1]
    chosen = torch.randperm(size, generator=g)[:count].sort().values
    selection = Selection(side, chosen, size=size)
    return SparseUpdate(selection, torch.randn(selection.part_shape(shape), generator=g,
                                               dtype=DTYPE))


def blocks(*ranges) -> torch.Tensor:
    return torch.cat([torch.arange(start, start + size) for start, size in ranges])


# (out, in), the updates, each rank's output rows: plain column-parallel at tp 2 and 4, a
# fused gate_up at tp 2 (two blocks per rank), a K/V slice of 2 heads of 8 at tp 4 (each
# head on two ranks), 8 rows inside one block of B's 16 at tp 16.
COLUMN_CASES = {
    "column tp 2": ((64, 48), 2, lambda r: blocks((32 * r, 32))),
    "column tp 4": ((64, 48), 4, lambda r: blocks((16 * r, 16))),
    "fused gate_up tp 2": ((64, 48), 2, lambda r: blocks((16 * r, 16), (32 + 16 * r, 16))),
    "K/V under GQA tp 4": ((16, 48), 4, lambda r: blocks((8 * (r // 2), 8))),
    "inside a block tp 16": ((128, 48), 16, lambda r: blocks((8 * r, 8))),
}


def updates(shape, seed):
    out, in_ = shape
    b1 = 16 if out % 16 == 0 and out > 16 else 8
    return {"kron": kron((out // b1, in_ // 8), (b1, 8), seed),
            "kron, B of one row block": kron((1, in_ // 8), (out, 8), seed + 1),
            "s2ft rows": sparse("rows", shape, out // 3, seed + 2),
            "s2ft cols": sparse("cols", shape, in_ // 4, seed + 3)}


@pytest.mark.parametrize("case", list(COLUMN_CASES))
def test_column_parallel_ranks_give_their_rows_of_the_whole_output(case):
    shape, tp, rows_of = COLUMN_CASES[case]
    x = torch.randn(5, shape[1], dtype=DTYPE)
    for name, update in updates(shape, 1).items():
        whole = x @ materialised(update, shape).T
        for rank in range(tp):
            rows = rows_of(rank)
            part = shard(update, rows, None)
            got = torch.zeros(5, rows.numel(), dtype=DTYPE) if part is None else \
                x @ materialised(part, (rows.numel(), shape[1])).T
            torch.testing.assert_close(got, whole[:, rows], rtol=1e-12, atol=1e-12,
                                       msg=f"{name}, rank {rank}")
            if part is not None:  # the cut update is the same kind, never materialised
                assert type(part) is type(update)


@pytest.mark.parametrize("tp", [2, 4])
def test_row_parallel_rank_outputs_sum_to_the_whole_output(tp):
    shape = (64, 96)
    x = torch.randn(5, shape[1], dtype=DTYPE)
    size = shape[1] // tp
    for name, update in updates(shape, 2).items():
        total = torch.zeros(5, shape[0], dtype=DTYPE)
        for rank in range(tp):
            cols = torch.arange(rank * size, (rank + 1) * size)
            part = shard(update, None, cols)
            if part is not None:
                total += x[:, cols] @ materialised(part, (shape[0], size)).T
        torch.testing.assert_close(total, x @ materialised(update, shape).T, rtol=1e-12, atol=1e-12,
                                   msg=name)


def test_a_selection_outside_the_rank_leaves_nothing():
    update = SparseUpdate(Selection("rows", torch.tensor([1, 3]), size=8),
                          torch.ones(2, 4, dtype=DTYPE))
    assert shard(update, torch.arange(4, 8), None) is None
    part = shard(update, torch.arange(2, 6), None)
    assert part.selection.indices().tolist() == [1] and part.selection.size == 4


def test_a_cut_through_blocks_of_b_is_refused_with_the_sizes():
    update = kron((3, 6), (16, 8), 0)  # 48 rows: tp 2 gives each rank 24, 1.5 blocks of B
    with pytest.raises(ShardError, match=r"24 rows of the 48 \(from row 24\) are neither whole "
                                         r"blocks of B's 16 rows nor inside one block"):
        shard(update, torch.arange(24, 48), None)
    with pytest.raises(ShardError, match=r"12 columns of the 48 \(from column 0\)"):
        shard(update, None, torch.arange(12))
