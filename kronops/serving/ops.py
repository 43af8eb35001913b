"""The serving ops: the adapters of one layer applied to a mixed batch, added into its output.

``kronops::routed_kron_add``    y[t] += x[t] @ kron(a[p], b[p]).T     (KronA/LoKr, scale in b)
``kronops::routed_sparse_add``  y[t] += member p's S²FT Δ applied to x[t], in place:
                                rows mode y[t, R_p] += x[t] Δ_pᵀ,
                                cols mode y[t] += x[t, C_p] Δ_pᵀ

x: (M, in) and y: (M, out) are a layer's flattened input and output. Tokens arrive grouped
by member: tokens[offsets[p]:offsets[p+1]] are the rows of x that member p adapts (starting
at row starts[p] and consecutive, or starts[p] = -1), and ``tiles`` is that grouping cut into
runs for the kernels (``routes.tile_table``). S²FT members are stored padded to one width
W: ``values`` (P·W, in) holds Δ_p's rows (rows mode) or Δ_pᵀ's rows (cols mode) in
block p, its first widths[p] real and the rest zero, and ``index`` (P·W,) the rows R_p or
columns C_p (0 in the padding).

Each op is defined once. Its default kernel (every device) pads every member's tokens to
the longest run and computes all members with a few batched products when that at most
doubles the tokens (balanced batches, decode steps), and otherwise takes one member at a
time (a slice when its rows are consecutive, else a gather). On CUDA one Triton launch
serves every member (``kernels.serving``); on CPU, with the native library, a C++ kernel
takes one member at a time (``csrc/serving.cpp``). All update y in place and have no
autograd: the bank serves. Every kernel first checks its arguments by the same rules
(``check_*`` below), so a bad call is refused before y changes; token and index values are
read where they are on the host (CPU): on CUDA the Triton kernels skip out-of-range ones.
"""
import torch

from .. import backends
from ..checks import OpChecks
from ..dtypes import autocast_off, composite_dtype

kernels = backends.import_kernels()

KRON = OpChecks("kronops::routed_kron_add")
SPARSE = OpChecks("kronops::routed_sparse_add")


# Argument checks of the ops called directly, shared by the PyTorch and the Triton kernels:
# the native kernels' rules (csrc/serving.cpp), in the same order and words. Nothing is
# written into y before all of them pass.

def check_rows(c: OpChecks, y: torch.Tensor, x: torch.Tensor) -> None:
    """y and x are 2-D floating-point tensors with the same rows, on one device."""
    if y.dim() != 2 or x.dim() != 2 or y.shape[0] != x.shape[0]:
        raise c.value_error(f"y and x must be 2-D with the same rows, got {list(y.shape)} and "
                            f"{list(x.shape)}")
    c.floating("y", y)
    c.floating("x", x)
    c.on("y", y, x.device)


def check_routing(c: OpChecks, x: torch.Tensor, tokens: torch.Tensor, tiles: torch.Tensor,
                  offsets: list[int], starts: list[int], members: int) -> None:
    """The grouping of x's rows by ``members`` members (see the module docstring)."""
    c.on("tiles", tiles, x.device)
    if tiles.dtype != torch.int64:
        raise c.type_error(f"tiles must have dtype torch.int64, got {tiles.dtype}")
    if tiles.dim() != 2 or tiles.shape[1] != 4:
        raise c.value_error(f"tiles must have shape (n, 4), got {list(tiles.shape)}")
    if len(offsets) != members + 1:
        raise c.value_error(f"offsets must have {members + 1} entries (members + 1), "
                            f"got {len(offsets)}")
    if len(starts) != members:
        raise c.value_error(f"starts must have {members} entries (one per member), "
                            f"got {len(starts)}")
    c.index("tokens", tokens, x.shape[0], x.device)
    if offsets[0] != 0 or offsets[-1] != tokens.numel():
        raise c.value_error(f"offsets must run from 0 to the number of tokens {tokens.numel()}, "
                            f"got {offsets}")
    if any(lo > hi for lo, hi in zip(offsets, offsets[1:])):
        raise c.value_error(f"offsets must not decrease, got {offsets}")
    for p, (lo, hi, start) in enumerate(zip(offsets, offsets[1:], starts)):
        if start != -1 and not 0 <= start <= x.shape[0] - (hi - lo):
            raise c.value_error(f"starts[{p}] = {start} must be -1 or a row of x with {hi - lo} "
                                f"rows after it")
        if start >= 0 and tokens.device.type == "cpu" and not torch.equal(
                tokens[lo:hi], torch.arange(start, start + hi - lo)):
            raise c.value_error(f"starts[{p}] = {start} but tokens[{lo}:{hi}] are not the rows "
                                f"{start} to {start + hi - lo - 1}")


def check_routed_kron_add(y, x, a, b, tokens, tiles, offsets, starts) -> None:
    check_rows(KRON, y, x)
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0]:
        raise KRON.value_error(f"a and b must be (members, p, q) stacks of the same length, "
                               f"got {list(a.shape)} and {list(b.shape)}")
    KRON.like("a", a, x)
    KRON.like("b", b, x)
    (members, a1, a2), (b1, b2) = a.shape, b.shape[1:]
    if x.shape[1] != a2 * b2:
        raise KRON.value_error(f"x must have a2*b2 = {a2 * b2} columns, got {list(x.shape)}")
    if y.shape[1] != a1 * b1:
        raise KRON.value_error(f"y must have a1*b1 = {a1 * b1} columns, got {list(y.shape)}")
    check_routing(KRON, x, tokens, tiles, offsets, starts, members)


def check_routed_sparse_add(y, x, values, index, tokens, tiles, offsets, starts, widths,
                            cols) -> None:
    check_rows(SPARSE, y, x)
    members = len(widths)
    if members == 0:
        raise SPARSE.value_error("widths must have one entry per member, got none")
    if values.dim() != 2 or values.shape[0] % members:
        raise SPARSE.value_error(f"values must be (members * W, features), W rows for each of "
                                 f"the {members} members, got {list(values.shape)}")
    if index.dim() != 1 or index.shape[0] != values.shape[0]:
        raise SPARSE.value_error(f"index must have values' {values.shape[0]} entries, "
                                 f"got shape {list(index.shape)}")
    features = y.shape[1] if cols else x.shape[1]  # values' rows: Δᵀ's or Δ's
    if values.shape[1] != features:
        raise SPARSE.value_error(
            f"values must have {features} columns "
            f"({'y' if cols else 'x'}'s width in {'cols' if cols else 'rows'} mode), "
            f"got {list(values.shape)}")
    SPARSE.like("values", values, x)
    SPARSE.index("index", index, x.shape[1] if cols else y.shape[1], x.device)
    width = values.shape[0] // members
    for p, w in enumerate(widths):
        if not 0 <= w <= width:
            raise SPARSE.value_error(f"widths[{p}] = {w} must lie in [0, {width}]")
    check_routing(SPARSE, x, tokens, tiles, offsets, starts, members)


PADDING_LIMIT = 2  # the batched path runs while padding at most doubles the tokens


def member_rows(tokens: torch.Tensor, offsets: list[int], starts: list[int]):
    """(p, rows) for every member p with tokens: its rows of x and y as a slice when they
    are one contiguous range (``starts[p]``, else -1), else as an index tensor."""
    return [(p, slice(start, start + hi - lo) if start >= 0 else tokens[lo:hi])
            for p, (lo, hi, start) in enumerate(zip(offsets, offsets[1:], starts)) if hi > lo]


def padded_rows(tokens: torch.Tensor, offsets: list[int]):
    """(members, rows, real) for the batched path, or None for one member (no padding
    needed: a slice when consecutive) or when padding would more than double the tokens:
    members (Q,) the members with tokens, rows (Q, n) their rows of x
    padded to the longest run n with row 0, real (Q, n) False in the padding (None when
    every run has the same length: no padding)."""
    counts = [hi - lo for lo, hi in zip(offsets, offsets[1:])]
    members = [p for p, count in enumerate(counts) if count]
    longest = max(counts, default=0)
    if len(members) < 2 or len(members) * longest > PADDING_LIMIT * offsets[-1]:
        return None
    device = tokens.device
    if len(members) * longest == offsets[-1]:  # equal runs: no padding
        return torch.tensor(members, device=device), tokens.view(len(members), longest), None
    first = torch.tensor([offsets[p] for p in members], device=device)
    length = torch.tensor([counts[p] for p in members], device=device)
    step = torch.arange(longest, device=device)
    real = step < length[:, None]
    rows = tokens[(first[:, None] + step).clamp(max=tokens.numel() - 1)] * real
    return torch.tensor(members, device=device), rows, real


def gather_padded(x: torch.Tensor, rows: torch.Tensor, real) -> torch.Tensor:
    """x's rows (Q, n, ...) for padded ``rows`` (Q, n), zero in the padding (``real``
    False; None: no padding)."""
    xs = x.index_select(0, rows.flatten()).view(*rows.shape, *x.shape[1:])
    return xs if real is None else xs * real.view(*real.shape, *[1] * (x.dim() - 1))


def take(x: torch.Tensor, rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def add_rows(y: torch.Tensor, rows, part: torch.Tensor) -> None:
    """y[rows] += part (rows: a slice or an index tensor)."""
    if isinstance(rows, slice):
        y[rows] += part
    else:
        y.index_add_(0, rows, part)


def kron_batches(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """vec(a[q] X b[q]ᵀ) for x (Q, n, a2, b2), a (Q, a1, a2), b (Q, b1, b2) -> (Q, n, a1*b1),
    the cheaper side contracted first, in ``composite_dtype``."""
    q, n, a2, b2 = x.shape
    a1, b1 = a.shape[1], b.shape[1]
    work = composite_dtype(x)
    x, a, b = x.to(work), a.to(work), b.to(work)
    if b1 * a2 * (b2 + a1) <= a1 * b2 * (a2 + b1):
        t = torch.matmul(x.reshape(q, n * a2, b2), b.mT).view(q, n, a2, b1)
        y = torch.matmul(a[:, None], t)
    else:
        y = torch.matmul(torch.matmul(a[:, None], x).view(q, n * a1, b2), b.mT)
    return y.reshape(q, n, a1 * b1)


def default_routed_kron_add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                            tokens: torch.Tensor, tiles: torch.Tensor, offsets: list[int],
                            starts: list[int]) -> None:
    """The default kernel: all members in two batched products, or one member at a time."""
    check_routed_kron_add(y, x, a, b, tokens, tiles, offsets, starts)
    a2, b2 = a.shape[2], b.shape[2]
    with autocast_off(x.device.type):
        padded = padded_rows(tokens, offsets)
        if padded is not None:
            members, rows, real = padded
            q, n = rows.shape
            xs = gather_padded(x.reshape(-1, a2, b2), rows, real)
            part = kron_batches(xs, a.index_select(0, members), b.index_select(0, members))
            y.index_add_(0, rows.flatten(), part.view(q * n, -1).to(y.dtype))
            return
        for p, rows in member_rows(tokens, offsets, starts):
            part = kron_batches(take(x, rows).reshape(1, -1, a2, b2), a[p:p + 1], b[p:p + 1])
            add_rows(y, rows, part[0].to(y.dtype))


def default_routed_sparse_add(y: torch.Tensor, x: torch.Tensor, values: torch.Tensor,
                              index: torch.Tensor, tokens: torch.Tensor, tiles: torch.Tensor,
                              offsets: list[int], starts: list[int], widths: list[int],
                              cols: bool) -> None:
    """The default kernel: all members in one batched product, or one member at a time."""
    check_routed_sparse_add(y, x, values, index, tokens, tiles, offsets, starts, widths, cols)
    members_count, features = len(widths), values.shape[1]
    width = values.shape[0] // members_count
    values, index = values.view(members_count, width, features), index.view(members_count, width)
    with autocast_off(x.device.type):
        work = composite_dtype(x)
        padded = padded_rows(tokens, offsets)
        if padded is not None:
            members, rows, real = padded
            q, n = rows.shape
            xs = gather_padded(x, rows, real).to(work)
            v, idx = values.index_select(0, members).to(work), index.index_select(0, members)
            if cols:  # y[t] += x[t, C] Δᵀ: gather the columns, then (n, W) @ (W, out)
                xs = torch.gather(xs, 2, idx[:, None, :].expand(q, n, width))
                y.index_add_(0, rows.flatten(), torch.matmul(xs, v).view(q * n, -1).to(y.dtype))
            elif y.is_contiguous():  # y[t, R] += x[t] Δᵀ, one index-add on y's elements
                flat = (rows[:, :, None] * y.shape[1] + idx[:, None, :]).flatten()
                y.view(-1).index_add_(0, flat, torch.matmul(xs, v.mT).flatten().to(y.dtype))
            else:
                y.index_put_((rows[:, :, None], idx[:, None, :]),
                             torch.matmul(xs, v.mT).to(y.dtype), accumulate=True)
            return
        for p, rows in member_rows(tokens, offsets, starts):
            v, idx = values[p, :widths[p]].to(work), index[p, :widths[p]]
            if cols:
                add_rows(y, rows, (take(x, rows)[:, idx].to(work) @ v).to(y.dtype))
            elif isinstance(rows, slice):
                y[rows].index_add_(1, idx, (take(x, rows).to(work) @ v.T).to(y.dtype))
            else:
                y.index_put_((rows[:, None], idx[None, :]), (take(x, rows).to(work) @ v.T).to(
                    y.dtype), accumulate=True)


routed_kron_add = backends.custom_op("routed_kron_add", default_routed_kron_add,
                                     mutates_args=("y",))
routed_sparse_add = backends.custom_op("routed_sparse_add", default_routed_sparse_add,
                                       mutates_args=("y",))


@routed_kron_add.register_fake
def _(y, x, a, b, tokens, tiles, offsets, starts):
    return None


@routed_sparse_add.register_fake
def _(y, x, values, index, tokens, tiles, offsets, starts, widths, cols):
    return None


def triton_routed_kron_add(y, x, a, b, tokens, tiles, offsets, starts):
    """CUDA kernel of ``routed_kron_add``: every member in one launch."""
    check_routed_kron_add(y, x, a, b, tokens, tiles, offsets, starts)
    kernels.triton_routed_kron_add(y, x.reshape(x.shape[0], a.shape[2], b.shape[2]), a, b,
                                   tokens, tiles)


def triton_routed_sparse_add(y, x, values, index, tokens, tiles, offsets, starts, widths, cols):
    """CUDA kernel of ``routed_sparse_add``: every member in one launch (Δ of cols mode is
    the transposed view of ``values``)."""
    check_routed_sparse_add(y, x, values, index, tokens, tiles, offsets, starts, widths, cols)
    kernels.triton_routed_sparse_add(y, x, values.T if cols else values, index, tokens, tiles,
                                     max(widths, default=0), cols)


backends.defined(routed_kron_add, routed_sparse_add)
if kernels is not None:
    backends.register_triton(routed_kron_add, triton_routed_kron_add, default_routed_kron_add)
    backends.register_triton(routed_sparse_add, triton_routed_sparse_add,
                             default_routed_sparse_add)
