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

Each op is declared once, by its ``OpSpec`` below. Its default kernel (every device) is
the PyTorch kernel (``torch_kernels``): a few batched products over padded members, or one
member at a time. On CUDA one Triton launch serves every member (``kronops.kernels.serving``);
on CPU, with the native library, a C++ kernel takes one member at a time
(``csrc/serving.cpp``). All update y in place and have no
autograd: the bank serves. Every kernel first checks its arguments by the same rules
(``check_*`` below), so a bad call is refused before y changes; token and index values are
read where they are on the host (CPU): on CUDA the Triton kernels skip out-of-range ones.
"""
import torch

from .. import backends
from ..backends import OpSpec
from ..checks import OpChecks
from ..kernels.serving import routed_kron, routed_sparse
from . import torch_kernels

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


def _mutating_fake(*args):
    return None


routed_kron_add = backends.define(OpSpec(
    "kronops::routed_kron_add(Tensor(a0!) y, Tensor x, Tensor a, Tensor b, Tensor tokens, Tensor tiles, SymInt[] offsets, SymInt[] starts) -> ()",
    torch_kernel=torch_kernels.routed_kron_add, fake=_mutating_fake,
    triton=routed_kron.triton_routed_kron_add, compile_cases=(routed_kron.compile_cases,),
    check=check_routed_kron_add, mutates=("y",)))

routed_sparse_add = backends.define(OpSpec(
    "kronops::routed_sparse_add(Tensor(a0!) y, Tensor x, Tensor values, Tensor index, Tensor tokens, Tensor tiles, SymInt[] offsets, SymInt[] starts, SymInt[] widths, bool cols) -> ()",
    torch_kernel=torch_kernels.routed_sparse_add, fake=_mutating_fake,
    triton=routed_sparse.triton_routed_sparse_add, compile_cases=(routed_sparse.compile_cases,),
    check=check_routed_sparse_add, mutates=("y",)))
