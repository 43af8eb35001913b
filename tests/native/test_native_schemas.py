"""The op schemas are written once, in the op specs (kronops/*/ops.py, read by
kronops.native.schemas): Python defines the ops from them, and the native library, defining
them without Python, registers the same strings."""
import ctypes
import os
import subprocess
import sys

import pytest
import torch

from kronops import native
from kronops.native.build import runner_path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLE = list(native.SCHEMAS)


def test_python_registers_the_table():
    names = native.op_names()
    assert len(set(names)) == len(names) == len(TABLE)
    registered = [str(getattr(torch.ops.kronops, n.split("::")[1]).default._schema) for n in names]
    assert registered == TABLE


def test_cpp_defines_the_table_without_python_ops():
    """A fresh process loads the library without kronops and lets it define the schemas;
    the dispatcher then holds exactly the table's strings (and the kernels register)."""
    if not native.available():
        pytest.skip(f"native library {native.load_error()}")
    code = (
        "import ctypes, sys, torch\n"
        f"lib = ctypes.CDLL({native.library_path()!r})\n"
        "for f in ('kronops_native_define_schemas', 'kronops_native_register_cpu'):\n"
        "    getattr(lib, f).restype = ctypes.c_char_p\n"
        "    error = getattr(lib, f)()\n"
        "    assert error is None, error\n"
        "assert 'kronops' not in sys.modules\n"
        f"for name in {[n.split('::')[1] for n in native.op_names()]!r}:\n"
        "    print(getattr(torch.ops.kronops, name).default._schema)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == TABLE


def test_cpp_table_matches_in_the_library():
    """The table compiled into the library (CMake's generated header) is the Python one."""
    if not native.available():
        pytest.skip(f"native library {native.load_error()}")
    lib = ctypes.CDLL(native.library_path())
    lib.kronops_native_schema.restype = ctypes.c_char_p
    compiled = [lib.kronops_native_schema(i).decode() for i in range(lib.kronops_native_schema_count())]
    assert compiled == TABLE


def test_runner_registers_the_table():
    """The C++ program (no Python at all) defines the schemas and prints what it registered."""
    runner = runner_path()
    if not os.path.exists(runner):
        pytest.skip(f"{runner} not built (python -m kronops.native build)")
    run = subprocess.run([runner, "--schemas"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == TABLE


def test_schema_lookup():
    assert native.schema("kronops::kron_rows") == \
        "(Tensor x, Tensor a, Tensor b, Tensor? bias, float scale) -> Tensor"
    with pytest.raises(KeyError, match="no schema for 'kronops::nope'"):
        native.schema("kronops::nope")


def test_cpp_declarations_follow_the_schemas():
    """The generated declarations the C++ kernels must match: types mapped from the schema."""
    from kronops.native.schemas import cpp_declaration
    assert cpp_declaration(native.SCHEMAS[native.op_names().index("kronops::kron_rows_grads")]) \
        == ("std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_rows_grads(const at::Tensor& dy, "
            "const at::Tensor& x, const at::Tensor& a, const at::Tensor& b, double scale, "
            "bool need_x, bool need_a, bool need_b, const std::optional<at::Tensor>& inner);")
    assert cpp_declaration("kronops::f(Tensor(a0!) y, Tensor(a1!)? m, SymInt[] s, int n) -> ()") \
        == ("void f(const at::Tensor& y, const std::optional<at::Tensor>& m, at::IntArrayRef s, "
            "int64_t n);")
    with pytest.raises(ValueError, match="no C.. type for the argument type 'str'"):
        cpp_declaration("kronops::g(Tensor x, str mode) -> Tensor")
