"""Test set-up: Triton kernels run in the CPU interpreter unless a CUDA GPU is present."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402

ON_GPU = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if ON_GPU else "cpu"
# bf16 tl.dot is broken in the Triton interpreter (values stored as uint16): GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor, magnitude: float | None = None) -> float:
    """||out - ref|| / ||ref|| in fp64; NaN anywhere gives inf (never passes).

    ``magnitude`` replaces ||ref|| where terms of the result may cancel (a sum of a
    product and a bias), to measure the error against the size of the terms.
    """
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if torch.isnan(out).any() or torch.isinf(out).any():
        return float("inf")
    denom = ref.norm().item() if magnitude is None else magnitude
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "",
                 magnitude: float | None = None) -> None:
    err = rel_err(out, ref, magnitude)
    assert err <= TOLERANCE[dtype], f"{what} relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"


@pytest.fixture
def triton_backend(monkeypatch):
    """Route the public ops through the Triton kernels (interpreter on CPU)."""
    monkeypatch.setenv("KRONOPS_BACKEND", "triton")


@pytest.fixture(autouse=True)
def _fresh_seed():
    """Fresh random inputs every run, with the seed printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
    yield seed
