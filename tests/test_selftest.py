"""``python -m kronops.selftest``: every backend of this machine within tolerance, and a kernel
that computes something else is reported as FAIL with exit status 1."""
import subprocess
import sys

import pytest

import kronops
from kronops import selftest

pytestmark = pytest.mark.dispatch_rules  # the self-test pins the paths it checks itself


def test_every_backend_and_op_is_within_tolerance():
    checks = selftest.run()
    backends = {c.backend for c in checks}
    assert "PyTorch kernels (cpu)" in backends
    assert ("native (cpu)" in backends) == kronops.native.available()
    assert {c.op for c in checks} == {"kron_linear", "kron_linear_merged", "kron_linear_summed",
                                      "kron_matmul", "sparse_linear", "sparse_adamw",
                                      "routed_kron_add", "routed_sparse_add"}
    assert all(c.ok for c in checks), selftest.report([c for c in checks if not c.ok])


def test_a_wrong_kernel_fails(monkeypatch, capsys):
    """kron_linear off by 0.1%: its rows fail in every dtype but fp16/bf16 (within their
    rounding), the rest pass, and the command exits 1."""
    def off(x, a, b, bias=None, *, scale=1.0):
        return kronops.kron_linear(x, a, b, bias, scale=scale * 1.001)
    monkeypatch.setattr(selftest, "kron_linear", off)
    assert selftest.main([]) == 1
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("kron_linear ")]
    assert rows and all((row[-1] == "FAIL") == (row[-4] in ("float64", "float32"))
                        for row in rows)
    assert "FAILED" in out.splitlines()[-1]


def test_command_line():
    run = subprocess.run([sys.executable, "-m", "kronops.selftest", "--seed", "3"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.splitlines()[0].split()[:4] == ["op", "path", "backend", "dtype"]
    assert run.stdout.splitlines()[-1].endswith("checks within tolerance")
