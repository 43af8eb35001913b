"""One native library per torch build: the folder it is built into and loaded from is keyed by
the torch it links (Python, torch version and commit, C++ ABI, machine, install folder), and a
library whose stamp names another torch is refused with the command that rebuilds it."""
import json
import os
import subprocess
import sys

import pytest

from kronops import native


def test_every_field_of_the_torch_build_changes_the_key():
    here = native.torch_build()
    other = {"python": "3.99", "torch": "2.12.0+cu126", "torch_commit": "0" * 40,
             "cxx11_abi": not here["cxx11_abi"], "machine": "riscv64",
             "torch_dir": "/another/venv/lib/python3.11/site-packages/torch"}
    assert set(other) == set(here)
    keys = {native.build_key(here)} | {native.build_key({**here, k: v}) for k, v in other.items()}
    assert len(keys) == len(other) + 1
    assert native.build_key() == native.build_key(here)
    assert native.library_path() == os.path.join(native.LIBRARY_ROOT, native.build_key(),
                                                 native.LIBRARY_NAME)


def _stamp(directory, **changes):
    with open(directory / native.STAMP_NAME, "w") as f:
        json.dump({**native.torch_build(), **changes}, f)


def test_a_library_stamped_for_another_torch_is_refused(tmp_path):
    _stamp(tmp_path)
    assert native.build_mismatch(str(tmp_path)) is None
    _stamp(tmp_path, torch="2.12.0+cu126", torch_dir="/another/venv/torch")
    why = native.build_mismatch(str(tmp_path))
    assert "'2.12.0+cu126'" in why and "/another/venv/torch" in why
    assert "python -m kronops.native build" in why
    (tmp_path / native.STAMP_NAME).unlink()
    why = native.build_mismatch(str(tmp_path))
    assert native.STAMP_NAME in why and "python -m kronops.native build" in why


FAKED_TORCH = """
import torch
torch.__version__ = "2.12.0+faked"
import kronops.native as n
print(n.available(), n.load_error())
"""


@pytest.mark.parametrize("choice", ["auto", "1"])
def test_another_torch_does_not_load_this_ones_library(choice):
    """The same checkout seen from a different torch build (faked version): the library built
    here is not this torch's, so it is not loaded (KRONOPS_NATIVE=1: importing fails), and the
    message names the builds that exist and the command that builds this one."""
    if not os.path.exists(native.library_path()):
        pytest.skip(f"native library {native.load_error()}")
    run = subprocess.run([sys.executable, "-c", FAKED_TORCH], capture_output=True, text=True,
                         env={**os.environ, "KRONOPS_NATIVE": choice}, timeout=300)
    output = run.stdout + run.stderr
    assert "not built for this torch" in output and "python -m kronops.native build" in output
    assert native.build_key() in output  # "built only for: <this environment's key>"
    if choice == "auto":
        assert run.returncode == 0 and run.stdout.startswith("False ")
    else:
        assert run.returncode != 0 and "KRONOPS_NATIVE=1" in run.stderr
