"""S²FT training steps read no index values on the host: the selection is checked once, when
a layer is made, never per forward, backward or optimizer step (on CUDA a read is a device
synchronisation)."""
import pytest
import torch
from conftest import ON_GPU
from host_reads import HostReads, host_reads
from torch import nn

import kronops
from kronops.s2ft import InPlaceAdamW, S2FTInPlaceLinear, S2FTLinear, Selection

STEPS = 3


def _model(kind: str, device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Two S²FT layers, one selecting rows by an index tensor, one columns by a range (and
    the reverse for in-place), with their optimizer."""
    first, second = nn.Linear(24, 40), nn.Linear(40, 16)
    index = torch.tensor([1, 4, 5, 9, 30])
    if kind == "adapter":
        model = nn.Sequential(S2FTLinear(first, rows=index), nn.Tanh(),
                              S2FTLinear(second, cols=range(8, 20))).to(device)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model = nn.Sequential(S2FTInPlaceLinear(first, rows=range(3, 11)), nn.Tanh(),
                          S2FTInPlaceLinear(second, cols=index)).to(device)
    return model, InPlaceAdamW(model)


def _reads(kind: str, device) -> HostReads:
    """The reads of STEPS training steps after a first one (which makes optimizer state)."""
    model, opt = _model(kind, device)
    x = torch.randn(6, 24, device=device)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step()
    with host_reads() as reads:
        for _ in range(STEPS):
            step()
    return reads


def test_the_count_sees_reads():
    """Making a Selection reads its index (sorted and unique, first, last: 3 reads); the
    test's own reads are not kronops' and are not counted; patched methods are restored."""
    index = torch.tensor([0, 3])
    with host_reads() as reads:
        Selection.rows(index, size=4)
        assert index[0].item() == 0 and bool(index.any())
    assert reads.count == 3, dict(reads.where)
    assert all(w.startswith("kronops/s2ft/selection.py") for w in reads.where)
    assert "item" not in vars(torch.Tensor) and "__bool__" not in vars(torch.Tensor)


@pytest.mark.parametrize("kind", ["adapter", "inplace"])
def test_native_steps_read_nothing(kind):
    if not kronops.native.available():
        pytest.skip(f"native library not loaded: {kronops.native.load_error()}")
    reads = _reads(kind, "cpu")
    assert reads.count == 0, dict(reads.where)


@pytest.mark.parametrize("kind", ["adapter", "inplace"])
def test_pytorch_kernel_steps_read_only_in_op_checks(kind):
    """The ops' PyTorch kernels check an index's values where they are on the host (the
    argument checks of ``torch.ops.kronops.sparse_*`` called directly); nothing else reads."""
    with kronops.native.disabled():
        reads = _reads(kind, "cpu")
    outside = {w: n for w, n in reads.where.items() if not w.startswith("kronops/checks.py")}
    assert outside == {}


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["adapter", "inplace"])
def test_cuda_steps_do_not_synchronise(kind):
    """Steps after the first (which autotunes the Triton kernels) never wait for the GPU."""
    model, opt = _model(kind, "cuda")
    x = torch.randn(6, 24, device="cuda")
    for i in range(1 + STEPS):
        opt.zero_grad()
        torch.cuda.set_sync_debug_mode("error" if i else "default")
        try:
            model(x).square().mean().backward()
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
