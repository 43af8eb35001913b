"""The serving ops (every adapter of a layer on a mixed batch) against fp64 loops over tokens:
the PyTorch default kernels and the Triton kernels (interpreter on CPU, compiled on a GPU)."""
import pytest
import torch
from conftest import KERNEL_DTYPES, assert_close

from kronops.serving.ops import routed_kron_add, routed_sparse_add
from kronops.serving.torch_kernels import padded_rows
from kronops.serving.routes import ROUTE_TILE, Route

# Batch rows' bank slots (-1: base), per route. "even": slot 1 has no rows; slot 0 has more
# tokens than one tile, so its run is cut in several; slot 3's one row is consecutive
# tokens; the default kernels pad all members to the longest run. "equal": runs of one
# length, no padding. "uneven": padding would
# more than double the tokens, so they take one member at a time (a slice for slots 2 and
# 3, a gather for slot 0).
ROUTES = {"even": [0, 2, -1, 0, 3, 2, 0], "equal": [0, 2, 3, 0, 2, 3, 3, 2, 0],
          "uneven": [0, 0, 0, -1, 0, 0, 0, 2, 0, 0, 0, 3, 0]}
PER_ROW = 23
MEMBERS = (0, 1, 2, 3)


def groups(route_name: str, device):
    slots = ROUTES[route_name]
    route = Route(torch.tensor(slots))
    found = route.groups(len(slots), PER_ROW, MEMBERS, torch.device(device))
    assert found.offsets[1] - found.offsets[0] > ROUTE_TILE  # several tiles for one member
    assert (padded_rows(found.tokens, found.offsets) is None) == (route_name == "uneven")
    return route, found


def padded(m: int, n: int, dtype, device):
    """A non-contiguous (m, n) view."""
    return torch.randn(m, n + 5, dtype=dtype, device=device)[:, 3:3 + n]


def member_of_token(route_name: str):
    """Which member adapts each token (None: the base model)."""
    return [MEMBERS.index(s) if s >= 0 else None for s in ROUTES[route_name]
            for _ in range(PER_ROW)]


@pytest.mark.parametrize("route_name", list(ROUTES))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 4, 6), (1, 7, 9, 1), (16, 2, 3, 17)])
def test_routed_kron_add(backend_device, dtype, shape, route_name):
    a1, a2, b1, b2 = shape
    route, found = groups(route_name, backend_device)
    rows = len(ROUTES[route_name]) * PER_ROW
    x = padded(rows, a2 * b2, dtype, backend_device)
    y = torch.randn(rows, a1 * b1, dtype=dtype, device=backend_device)
    a = torch.randn(len(MEMBERS), a1, a2, dtype=dtype, device=backend_device)
    b = torch.randn(len(MEMBERS), b2, b1, dtype=dtype, device=backend_device).mT  # strided
    tiles = route.tiles(found, tuple((p, 0) for p in range(len(MEMBERS))), x.device)
    ref = y.double().clone()
    for t, p in enumerate(member_of_token(route_name)):
        if p is not None:
            ref[t] += x[t].double() @ torch.kron(a[p].double(), b[p].double().contiguous()).T
    magnitude = ref.norm().item() + y.double().norm().item()  # the sum may cancel
    routed_kron_add(y, x, a, b, found.tokens, tiles, found.offsets, found.starts)
    assert_close(y, ref, dtype, "routed_kron_add", magnitude=magnitude)


@pytest.mark.parametrize("route_name", list(ROUTES))
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("cols", [False, True])
def test_routed_sparse_add(backend_device, dtype, cols, route_name):
    in_features, out_features = 37, 29
    size, other = (in_features, out_features) if cols else (out_features, in_features)
    widths = [5, 1, 11, 4]  # a block per member, padded to the widest
    width = max(widths)
    index = torch.zeros(len(widths) * width, dtype=torch.int64)
    values = torch.zeros(len(widths) * width, other, dtype=dtype)
    for p, w in enumerate(widths):
        index[p * width:p * width + w] = torch.randperm(size)[:w].sort().values
        values[p * width:p * width + w] = torch.randn(w, other, dtype=dtype)
    route, found = groups(route_name, backend_device)
    rows = len(ROUTES[route_name]) * PER_ROW
    x = padded(rows, in_features, dtype, backend_device)
    y = torch.randn(rows, out_features, dtype=dtype, device=backend_device)
    if route_name == "equal":  # a strided output too
        y = padded(rows, out_features, dtype, backend_device)
    values = values.T.contiguous().T.to(backend_device)  # column-major: any strides
    index = index.to(backend_device)
    columns = tuple((p * width, p * width + w) for p, w in enumerate(widths))
    tiles = route.tiles(found, columns, x.device)
    ref = y.double().clone()
    for t, p in enumerate(member_of_token(route_name)):
        if p is None:
            continue
        part = slice(p * width, p * width + widths[p])
        idx, v = index[part], values[part].double()
        if cols:
            ref[t] += x[t, idx].double() @ v
        else:
            ref[t, idx] += x[t].double() @ v.T
    magnitude = ref.norm().item() + y.double().norm().item()
    routed_sparse_add(y, x, values, index, found.tokens, tiles, found.offsets, found.starts,
                      widths, cols)
    assert_close(y, ref, dtype, "routed_sparse_add", magnitude=magnitude)


def test_kernels_never_leave_their_tensors(triton_backend):
    """Token and index values out of range (a table the host checks never saw) read and
    write nothing: rows they name are left alone, nothing crashes."""
    from kronops.kernels.serving.routed_kron import launch_routed_kron_add
    from kronops.kernels.serving.routed_sparse import launch_routed_sparse_add
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(6, 12, device=device)
    tokens = torch.tensor([0, -3, 6, 2, 99], device=device)
    tiles = torch.tensor([[0, 5, 0, 2]], device=device)
    y = torch.zeros(6, 12, device=device)
    launch_routed_kron_add(y, x.view(6, 3, 4), torch.randn(1, 3, 3, device=device),
                           torch.randn(1, 4, 4, device=device), tokens, tiles)
    assert y[[1, 3, 4, 5]].abs().sum() == 0 and y[[0, 2]].abs().sum() > 0
    y.zero_()
    index = torch.tensor([3, 40], device=device)  # 40 is out of range
    launch_routed_sparse_add(y, x, torch.randn(2, 12, device=device), index, tokens, tiles, 2,
                             False)
    assert y[:, [i for i in range(12) if i != 3]].abs().sum() == 0
    assert y[[1, 3, 4, 5]].abs().sum() == 0 and y[[0, 2], 3].abs().sum() > 0


def test_route_tokens_follow_repeated_rows():
    """An input with k rows per route entry (beam search) maps row r to entry r // k."""
    route = Route(torch.tensor([1, -1, 0]))
    found = route.groups(6, 2, (0, 1), torch.device("cpu"))
    assert found.offsets == [0, 4, 8] and found.starts == [8, 0]
    assert found.tokens.tolist() == [8, 9, 10, 11, 0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="rows"):
        route.groups(4, 2, (0, 1), torch.device("cpu"))
