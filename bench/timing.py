"""Timing and the two hardware ceilings (copy bandwidth, GEMM rate), measured in the same run."""
import statistics
import time

import torch

QUANTILES = (0.5, 0.2, 0.8)


def time_call(fn, device: torch.device, *, repeats: int = 7) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of ``fn()``.

    CUDA: triton.testing.do_bench (CUDA events, L2 flushed between calls). CPU: one
    warm-up call, then ``repeats`` timed calls; ``fn`` rotates its inputs itself.
    """
    if device.type == "cuda":
        import triton.testing
        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES)))
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return statistics.median(times), q[1], q[7]


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.randn(n // 4, device=device)
    dst = torch.empty_like(src)
    ms = time_call(lambda: dst.copy_(src), device)[0]
    return 2 * n / (ms * 1e-3) / 1e9


def gemm_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate in TFLOP/s on random data (8192^3 on a GPU, 1024^3 on CPU)."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_call(lambda: a @ b, device)[0]
    return 2 * n ** 3 / (ms * 1e-3) / 1e12
