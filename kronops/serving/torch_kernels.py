"""The PyTorch kernels of the serving ops, named after them: the default kernel of each op on
every device (``kronops.serving.ops`` declares the ops and the layout of their arguments).

Each pads every member's tokens to the longest run and computes all members with a few
batched products when that at most doubles the tokens (balanced batches, decode steps), and
otherwise takes one member at a time (a slice when its rows are consecutive, else a
gather). Each kernel takes its op's arguments; ``kronops.backends`` runs it after the op's
argument check, with autocast off.
"""
import torch

from ..dtypes import composite_dtype
from ..kron.torch_kernels import b_first

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
    the cheaper side contracted first (``b_first``), in ``composite_dtype``."""
    q, n, a2, b2 = x.shape
    a1, b1 = a.shape[1], b.shape[1]
    work = composite_dtype(x)
    x, a, b = x.to(work), a.to(work), b.to(work)
    if b_first(a1, a2, b1, b2):
        t = torch.matmul(x.reshape(q, n * a2, b2), b.mT).view(q, n, a2, b1)
        y = torch.matmul(a[:, None], t)
    else:
        y = torch.matmul(torch.matmul(a[:, None], x).view(q, n * a1, b2), b.mT)
    return y.reshape(q, n, a1 * b1)


def routed_kron_add(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    tokens: torch.Tensor, tiles: torch.Tensor, offsets: list[int],
                    starts: list[int]) -> None:
    """y[t] += x[t] @ kron(a[p], b[p]).T for member p's tokens t: all members in two batched
    products, or one member at a time."""
    a2, b2 = a.shape[2], b.shape[2]
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


def routed_sparse_add(y: torch.Tensor, x: torch.Tensor, values: torch.Tensor,
                      index: torch.Tensor, tokens: torch.Tensor, tiles: torch.Tensor,
                      offsets: list[int], starts: list[int], widths: list[int],
                      cols: bool) -> None:
    """y[t] += member p's Δ applied to x[t] for its tokens t (rows or cols mode): all members
    in one batched product, or one member at a time."""
    members_count, features = len(widths), values.shape[1]
    width = values.shape[0] // members_count
    values, index = values.view(members_count, width, features), index.view(members_count, width)
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
