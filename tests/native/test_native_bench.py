"""The CPU-backend benchmark rows: every provider is checked against fp64; the native and
FastKron providers appear only when there is something to run."""
import torch

from bench import native_cases
from bench.runner import failures, run_case
from kronops import native

CPU = torch.device("cpu")


def test_kron_rows_check_every_provider():
    rows = []
    for case in native_cases.kron_cpu_cases(24, [(3, 4), (5, 2), (2, 3)], torch.float32, CPU):
        rows += run_case(case, torch.float32, CPU, budget_s=0.02)
    providers = {r["provider"] for r in rows}
    assert {"kronops (PyTorch kernels)", "torch autograd, same expression",
            "naive (torch.kron)"} <= providers
    assert ("kronops (native)" in providers) == native.available()
    assert (native_cases.FASTKRON in providers) == (native_cases.fastkron() is not None)
    assert failures(rows) == [] and all(r["error_ok"] for r in rows)


def test_sparse_rows_check_every_provider():
    for mode in ("rows", "cols"):
        rows = []
        for case in native_cases.s2ft_cpu_cases(16, 24, 20, 0.2, mode, torch.float32, CPU):
            rows += run_case(case, torch.float32, CPU, budget_s=0.02)
        assert failures(rows) == [] and all(r["error_ok"] for r in rows)
