"""Timing and the two hardware ceilings (copy bandwidth, GEMM rate), measured in the same run.

On a GPU each provider is timed twice: replayed from a CUDA graph
(``triton.testing.do_bench_cudagraph``: the device's time, host work and launch latency
gone), which is the reported time, and called from Python (``triton.testing.do_bench``:
CUDA events, L2 flushed between calls), reported beside it as the host-inclusive time. A
provider that cannot be captured (a host synchronisation or a pageable copy inside) is
reported by its host-inclusive time alone, marked as such. On a CPU the providers of one case are timed together, in rounds: every
round calls each provider once, in an order shuffled from round to round (a fixed seed), so
that a change of machine load (other processes, frequency, caches warming) falls on all of
them alike instead of on whichever provider happened to be timed at that moment, and so
that no provider always runs right after the same other one (a rotated order keeps each
provider's predecessor: one that leaves large buffers or busy threads behind then slows
its successor every round; measured at up to 1.5x on the small CPU shapes, bench/NOTES.md).
Rounds go on until the spread of every provider's times is small or the case's time budget
is spent.
"""
import contextlib
import ctypes
import random
import statistics
import time
from dataclasses import dataclass

import torch

QUANTILES = (0.5, 0.2, 0.8, 0.0)   # median, 20th, 80th percentile, min

# CPU rounds: at least MIN_ROUNDS timed calls per provider; stop once every provider's
# (p80 - p20) / median is at most TARGET_SPREAD, or once the budget is spent.
CPU_BUDGET_S = 2.0
MIN_ROUNDS = 5
MAX_ROUNDS = 1000
TARGET_SPREAD = 0.05
WARMUP_ROUNDS = 1


@dataclass
class Timing:
    """Milliseconds per call of one provider: median, 20th and 80th percentile, min; the
    number of timed calls (None where do_bench chose it); on a GPU the host-inclusive
    median and whether the figures are CUDA-graph replays (None on CPU)."""
    median_ms: float
    p20_ms: float
    p80_ms: float
    min_ms: float
    calls: int | None = None
    host_ms: float | None = None
    cuda_graph: bool | None = None


def gpu_timing(fn) -> Timing:
    """``fn`` on a GPU: CUDA-graph replay figures, and do_bench's median beside them (the
    do_bench figures alone when ``fn`` cannot be captured in a graph)."""
    import triton.testing
    median, low, high, least = triton.testing.do_bench(fn, warmup=25, rep=100,
                                                       quantiles=list(QUANTILES))
    try:
        graph = triton.testing.do_bench_cudagraph(fn, rep=100, quantiles=list(QUANTILES))
    except RuntimeError:  # capture refused: a host sync or pageable copy inside fn
        torch.cuda.synchronize()
        return Timing(median, low, high, least, host_ms=median, cuda_graph=False)
    return Timing(*graph, host_ms=median, cuda_graph=True)


def _summary(times: list[float]) -> Timing:
    if len(times) == 1:
        return Timing(times[0], times[0], times[0], times[0], 1)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return Timing(statistics.median(times), q[1], q[7], min(times), len(times))


def _spread(times: list[float]) -> float:
    t = _summary(times)
    return (t.p80_ms - t.p20_ms) / t.median_ms if t.median_ms > 0 else 0.0


def time_providers(fns: dict, device: torch.device, *, budget_s: float = CPU_BUDGET_S,
                   min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS,
                   target_spread: float = TARGET_SPREAD, warmup_rounds: int = WARMUP_ROUNDS,
                   clock=time.perf_counter, settings: dict | None = None) -> dict:
    """{name: Timing} for the callables ``fns`` (``fn()``, rotating its own inputs).

    CUDA: ``gpu_timing`` for each in turn. CPU: ``warmup_rounds`` untimed
    rounds, then timed rounds, each calling every provider once (order shuffled per
    round, a fixed seed), until at least ``min_rounds`` rounds are done and either every
    provider's spread is within ``target_spread`` or ``budget_s`` seconds of ``clock`` have
    passed since the first timed round; at most ``max_rounds``.

    ``settings``: {name: context factory} for providers that run in another process state
    (``kronops.native.disabled``). The context is entered and left outside the timed call,
    and the provider after it is called once untimed first: leaving the context
    re-registers kernels, and the dispatcher's first call after that is slower (~30-50 us)
    for reasons that are not the next provider's.
    """
    if device.type == "cuda":
        return {name: gpu_timing(fn) for name, fn in fns.items()}
    settings = settings or {}
    names = list(fns)

    def timed(name) -> float:
        with settings[name]() if name in settings else contextlib.nullcontext():
            t0 = clock()
            fns[name]()
            return (clock() - t0) * 1e3

    for _ in range(warmup_rounds):
        for name in names:
            timed(name)
    times = {name: [] for name in names}
    after_setting = False
    start = clock()
    order, shuffle = list(names), random.Random(0).shuffle
    for round_ in range(max_rounds):
        shuffle(order)
        for name in order:
            if after_setting:
                fns[name]()
            times[name].append(timed(name))
            after_setting = name in settings
        if round_ + 1 < min_rounds:
            continue
        if clock() - start >= budget_s:
            break
        if all(_spread(t) <= target_spread for t in times.values()):
            break
    return {name: _summary(t) for name, t in times.items()}


def time_call(fn, device: torch.device, **kwargs) -> tuple[float, float, float]:
    """(median, 20th, 80th percentile) milliseconds of ``fn()`` alone (see time_providers)."""
    t = time_providers({"fn": fn}, device, **kwargs)["fn"]
    return t.median_ms, t.p20_ms, t.p80_ms


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


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
CPU_REGIMES = ("default", "warm")


def set_cpu_regime(regime: str) -> None:
    """The allocator regime CPU rows are timed in. ``default``: glibc's malloc as the process
    got it (blocks above its mmap threshold are mapped afresh per allocation: a 32 MiB output
    page-faults on every call). ``warm``: no mmap and no trimming (what
    ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...`` gives), so
    freed memory is reused warm, as in a long-running process with a caching allocator."""
    if regime not in CPU_REGIMES:
        raise ValueError(f"regime must be one of {CPU_REGIMES}, got {regime!r}")
    if regime == "default":
        return
    libc = ctypes.CDLL(None)
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        raise RuntimeError("mallopt refused the warm allocator settings (not glibc?)")
