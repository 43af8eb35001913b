"""Run benchmark cases: check each provider against fp64, time them, and make result rows.

Only kronops' own providers (``is_kronops``) can fail a run: a baseline (the naive
reference, composite, full fine-tuning, PEFT, torch AdamW ...) whose result overflows or is
out of tolerance, as the naive references readily do in fp16, is marked and still timed.
"""
import math

import torch

from kronops.testing import TOLERANCE, relative_error

from .cases import INPUT_SETS, Case
from .timing import CPU_BUDGET_S, time_providers


def is_kronops(provider: str) -> bool:
    """Whether a provider is kronops' own code ("kronops", "kronops S²FT adapter", ...)."""
    return provider == "kronops" or provider.startswith("kronops ")


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


def _rotating(run):
    counter = iter(range(1 << 62))
    return lambda: run(next(counter) % INPUT_SETS)


def run_case(case: Case, dtype, device, ceilings: dict | None = None, *,
             budget_s: float = CPU_BUDGET_S) -> list[dict]:
    """One result row per provider; the naive provider's time is the speedup baseline.

    Every provider is checked first (its first call, on input set 0, against the case's
    reference, or against ``case.references[name]`` of that output), then all are timed
    together (``time_providers``: interleaved rounds on CPU within ``budget_s`` seconds).
    Generation cases' rows add ``tokens_per_s`` (from the median); the other rows hold None
    there. Row fields about the check: ``rel_error`` (None when unchecked or not finite),
    ``overflow`` (the result has Inf or NaN), ``error_ok`` (within tolerance, or unchecked)
    and ``kronops`` (the provider is kronops' own; only those fail the run).
    """
    reference = case.reference()
    checks = {}
    for name, run in case.providers.items():
        if name in case.unchecked:
            checks[name] = None
        elif name in case.references:
            out = run(0)
            checks[name] = relative_error(out, case.references[name](out))
        else:
            checks[name] = relative_error(run(0), reference)
    timings = time_providers({name: _rotating(run) for name, run in case.providers.items()},
                             device, budget_s=budget_s, settings=case.settings)
    rows = []
    for name, run in case.providers.items():
        t, error = timings[name], checks[name]
        overflow = error is not None and not math.isfinite(error)
        row = dict(op=case.op, mode=case.mode, shape=case.shape, size=case.size,
                   dtype=str(dtype).removeprefix("torch."), device=device.type, provider=name,
                   kronops=is_kronops(name),
                   median_ms=t.median_ms, min_ms=t.min_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms,
                   calls=t.calls, host_ms=t.host_ms, cuda_graph=t.cuda_graph,
                   gbps=case.bytes / (t.median_ms * 1e-3) / 1e9,
                   tflops=case.flops / (t.median_ms * 1e-3) / 1e12,
                   tokens_per_s=None if case.tokens is None else case.tokens / (t.median_ms * 1e-3),
                   peak_memory_bytes=peak_memory(run, device),
                   rel_error=None if overflow else error,
                   overflow=overflow,
                   error_ok=error is None or error <= TOLERANCE[dtype])
        if ceilings:
            floor_ms = max(case.bytes / (ceilings["copy_gbps"] * 1e9),
                           case.flops / (ceilings["gemm_tflops"] * 1e12)) * 1e3
            row["roofline_pct"] = 100.0 * floor_ms / t.median_ms
            row["gemm_pct"] = 100.0 * row["tflops"] / ceilings["gemm_tflops"]
        rows.append(row)
    baseline = next((r["median_ms"] for r in rows if r["provider"].startswith("naive")), None)
    for row in rows:
        row["speedup_vs_naive"] = baseline / row["median_ms"] if baseline else None
    return rows


def failures(rows: list[dict]) -> list[dict]:
    """The rows that fail the run: kronops providers out of tolerance (or overflowing)."""
    return [r for r in rows if r["kronops"] and not r["error_ok"]]
