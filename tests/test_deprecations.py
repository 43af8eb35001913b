"""Names that moved keep working for one release, with a DeprecationWarning naming the new
place, and are the very objects of their new home."""
import importlib
import subprocess
import sys

import pytest

import kronops
from kronops import adapters, testing
from kronops.kron import torch_kernels as kron_kernels
from kronops.s2ft import torch_kernels as s2ft_kernels


@pytest.mark.parametrize("name", ["select", "Plan", "unpermute", "find_blocks", "Block"])
def test_s2ft_model_level_names_point_to_adapters(name):
    with pytest.warns(DeprecationWarning, match=f"kronops.adapters.{name}"):
        moved = getattr(kronops.s2ft, name)
    assert moved is getattr(adapters, name)


def test_unknown_s2ft_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        kronops.s2ft.no_such_name  # noqa: B018


@pytest.mark.parametrize("module, moved", [
    ("kronops.kron.reference", {"naive_kron_linear": testing.naive_kron_linear,
                                "naive_kron_matmul": testing.naive_kron_matmul,
                                "torch_kron_rows": kron_kernels.kron_rows}),
    ("kronops.s2ft.reference", {"naive_sparse_linear": testing.naive_sparse_linear,
                                "torch_sparse_linear": s2ft_kernels.sparse_linear}),
])
def test_reference_modules_warn_and_reexport(module, moved):
    sys.modules.pop(module, None)
    with pytest.warns(DeprecationWarning, match="kronops.testing"):
        shim = importlib.import_module(module)
    for name, obj in moved.items():
        assert getattr(shim, name) is obj


def test_the_package_itself_uses_no_deprecated_name():
    code = ("import warnings\n"
            "warnings.filterwarnings('error', category=DeprecationWarning, module=r'kronops(\\.|$)')\n"
            "import kronops, kronops.adapters, kronops.serving, kronops.selftest")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
