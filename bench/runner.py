"""Run benchmark cases: check each provider against fp64, time it, and make result rows."""
import torch

from kronops.testing import TOLERANCE, relative_error

from .cases import INPUT_SETS, Case
from .timing import time_call


def peak_memory(run, device) -> int | None:
    """Bytes allocated at the peak of one call above what was live before (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run(0)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def run_case(case: Case, dtype, device, ceilings: dict | None = None) -> list[dict]:
    """One result row per provider; the naive provider's time is the speedup baseline."""
    reference = case.reference()
    rows = []
    for name, run in case.providers.items():
        error = None if name in case.unchecked else relative_error(run(0), reference)
        counter = iter(range(1 << 62))

        def rotating(run=run):
            return run(next(counter) % INPUT_SETS)

        median, low, high = time_call(rotating, device)
        row = dict(op=case.op, mode=case.mode, shape=case.shape, size=case.size,
                   dtype=str(dtype).removeprefix("torch."), device=device.type, provider=name,
                   median_ms=median, p20_ms=low, p80_ms=high,
                   gbps=case.bytes / (median * 1e-3) / 1e9,
                   tflops=case.flops / (median * 1e-3) / 1e12,
                   peak_memory_bytes=peak_memory(run, device),
                   rel_error=error,
                   error_ok=error is None or error <= TOLERANCE[dtype])
        if ceilings:
            floor_ms = max(case.bytes / (ceilings["copy_gbps"] * 1e9),
                           case.flops / (ceilings["gemm_tflops"] * 1e12)) * 1e3
            row["roofline_pct"] = 100.0 * floor_ms / median
        rows.append(row)
    baseline = next((r["median_ms"] for r in rows if r["provider"].startswith("naive")), None)
    for row in rows:
        row["speedup_vs_naive"] = baseline / row["median_ms"] if baseline else None
    return rows
