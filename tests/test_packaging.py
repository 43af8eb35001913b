"""The wheel carries every subpackage: pyproject's package list matches the source tree."""
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_packaged():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for top, package in (("kronops", "kronops"), ("kernels", "kronops.kernels")):
        for folder, _, files in os.walk(os.path.join(ROOT, top)):
            if "__init__.py" in files and "__pycache__" not in folder:
                inner = os.path.relpath(folder, os.path.join(ROOT, top)).replace(os.sep, ".")
                found.add(package if inner == "." else f"{package}.{inner}")
    assert declared == found
