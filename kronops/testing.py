"""One error rule for the tests and the benchmark: norm-wise relative error against an fp64
reference, and the tolerance per dtype of the result.

The tolerances cover the rounding of the result to its dtype plus fp32 accumulation over
the op's reductions (fp32: ~1e-7 per rounding, summed in norm over up to thousands of
terms; fp16/bf16: the result's own rounding, 2^-11 and 2^-8).
"""
import torch

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2,
             torch.bfloat16: 1e-2}


def relative_error(out, ref, magnitude: float | None = None) -> float:
    """||out - ref|| / ||ref|| in fp64, the worst over paired sequences of tensors; NaN or
    Inf anywhere in ``out`` gives inf (never passes).

    ``magnitude`` replaces ||ref|| where terms of the result may cancel (a product plus a
    bias), to measure the error against the size of the terms.
    """
    if isinstance(out, (tuple, list)):
        return max((relative_error(o, r, magnitude) for o, r in zip(out, ref, strict=True)),
                   default=0.0)
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, ref {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item() if magnitude is None else magnitude
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out, ref, dtype: torch.dtype, what: str = "",
                 magnitude: float | None = None) -> None:
    """``relative_error(out, ref)`` within ``TOLERANCE[dtype]``, else AssertionError."""
    err = relative_error(out, ref, magnitude)
    assert err <= TOLERANCE[dtype], \
        f"{what} relative error {err:.3e} > {TOLERANCE[dtype]:.0e} ({dtype})"
