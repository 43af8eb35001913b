"""The serving ops: the adapters of one layer applied to a mixed batch, added into its output.

``kronops::routed_kron_add``    y[t] += x[t] @ kron(a[p], b[p]).T     (KronA/LoKr, scale in b)
``kronops::routed_sparse_add``  y[t] += x[t] W_pᵀ with W_p member p's S²FT Δ put in place:
                                rows mode Δ (S, in) into output rows ``index``, cols mode
                                Δ (out, S) from input columns ``index``; member p owns
                                Δ's segment [bounds[p], bounds[p+1])

x: (M, in) and y: (M, out) are a layer's flattened input and output. Tokens arrive grouped
by member: tokens[offsets[p]:offsets[p+1]] are the rows of x that member p adapts (starting
at row starts[p] and consecutive, or starts[p] = -1), and ``tiles`` is that grouping cut into
runs for the kernels (``routes.tile_table``). Each op is defined once: its default kernel
(every device) takes one member's rows at a time (a slice when consecutive, else a gather)
and adds the product back; on CUDA one Triton launch serves every member
(``kernels.serving``). Both update y in place and have no autograd: the bank serves.
"""
import torch

from .. import backends
from ..dtypes import autocast_off
from ..kron.reference import torch_kron_rows

kernels = backends.import_kernels()


def member_rows(tokens: torch.Tensor, offsets: list[int], starts: list[int]):
    """(p, rows) for every member p with tokens: its rows of x and y as a slice when they
    are one contiguous range (``starts[p]``, else -1), else as an index tensor."""
    return [(p, slice(start, start + hi - lo) if start >= 0 else tokens[lo:hi])
            for p, (lo, hi, start) in enumerate(zip(offsets, offsets[1:], starts)) if hi > lo]


def take(x: torch.Tensor, rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def default_routed_kron_add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            tokens: torch.Tensor, tiles: torch.Tensor, offsets: list[int],
                            starts: list[int]) -> None:
    """The default kernel: one composite ``kron_rows`` per member on its rows."""
    a2, b2 = a.shape[2], b.shape[2]
    with autocast_off(x.device.type):
        for p, rows in member_rows(tokens, offsets, starts):
            part = torch_kron_rows(take(x, rows).view(-1, a2, b2), a[p], b[p]).to(y.dtype)
            if isinstance(rows, slice):
                y[rows] += part
            else:
                y.index_add_(0, rows, part)


def default_routed_sparse_add(y: torch.Tensor, x: torch.Tensor, delta: torch.Tensor,
                              index: torch.Tensor, tokens: torch.Tensor, tiles: torch.Tensor,
                              offsets: list[int], starts: list[int], bounds: list[int],
                              cols: bool) -> None:
    """The default kernel: per member, its rows' product with its Δ segment, added in place."""
    with autocast_off(x.device.type):
        for p, rows in member_rows(tokens, offsets, starts):
            segment = slice(bounds[p], bounds[p + 1])
            if cols:
                part = (take(x, rows)[:, index[segment]] @ delta[:, segment].T).to(y.dtype)
                if isinstance(rows, slice):
                    y[rows] += part
                else:
                    y.index_add_(0, rows, part)
            else:
                part = (take(x, rows) @ delta[segment].T).to(y.dtype)
                if isinstance(rows, slice):
                    y[rows].index_add_(1, index[segment], part)
                else:
                    y.index_put_((rows[:, None], index[segment][None, :]), part, accumulate=True)


routed_kron_add = torch.library.custom_op("kronops::routed_kron_add", default_routed_kron_add,
                                          mutates_args=("y",))
routed_sparse_add = torch.library.custom_op("kronops::routed_sparse_add",
                                            default_routed_sparse_add, mutates_args=("y",))


@routed_kron_add.register_fake
def _(y, x, a, b, tokens, tiles, offsets, starts):
    return None


@routed_sparse_add.register_fake
def _(y, x, delta, index, tokens, tiles, offsets, starts, bounds, cols):
    return None


def triton_routed_kron_add(y, x, a, b, tokens, tiles, offsets, starts):
    """CUDA kernel of ``routed_kron_add``: every member in one launch."""
    kernels.triton_routed_kron_add(y, x.view(x.shape[0], a.shape[2], b.shape[2]), a, b, tokens,
                                   tiles)


def triton_routed_sparse_add(y, x, delta, index, tokens, tiles, offsets, starts, bounds, cols):
    """CUDA kernel of ``routed_sparse_add``: every member in one launch."""
    widest = max((hi - lo for lo, hi in zip(bounds, bounds[1:])), default=0)
    kernels.triton_routed_sparse_add(y, x, delta, index, tokens, tiles, widest, cols)


if kernels is not None:
    backends.register_triton(routed_kron_add, triton_routed_kron_add, default_routed_kron_add)
    backends.register_triton(routed_sparse_add, triton_routed_sparse_add,
                             default_routed_sparse_add)
