"""A KronA + S²FT model exported with torch.export and compiled by AOTInductor runs in a C++
program without Python (csrc/runner), with the outputs Python computes."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_close

from kronops import native
from kronops.native.build import runner_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "csrc", "runner"))
import export_model  # noqa: E402


def test_cpp_runner_matches_python(tmp_path):
    runner = runner_path()
    if not native.available() or not os.path.exists(runner):
        pytest.skip(f"native library or {runner} not built (python -m kronops.native build)")
    torch._dynamo.reset()
    package = export_model.export(str(tmp_path))
    out = tmp_path / "outputs.krt"
    run = subprocess.run([runner, package, str(tmp_path / "inputs.krt"), str(out)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert run.returncode == 0, run.stderr
    (got,) = export_model.read_tensors(str(out))
    (expected,) = export_model.read_tensors(str(tmp_path / "expected.krt"))
    (x,) = export_model.read_tensors(str(tmp_path / "inputs.krt"))
    assert got.shape == expected.shape == (5, 7, 24) and got.dtype == torch.float32
    assert_close(got, expected, torch.float32, "C++ vs Python")
    torch.manual_seed(0)
    model = export_model.KronS2FTModel().double().eval()  # the same weights, in fp64
    with torch.no_grad():
        assert_close(got, model(x.double()), torch.float32, "C++ vs fp64")


def test_tensor_file_round_trip(tmp_path):
    tensors = [torch.randn(2, 3, 4), torch.randn(5, dtype=torch.float64), torch.randn(0, 3)]
    export_model.write_tensors(str(tmp_path / "t.krt"), tensors)
    back = export_model.read_tensors(str(tmp_path / "t.krt"))
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(tensors, back))
