"""The wheel carries every subpackage: pyproject's package list matches the source tree."""
import os
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_packaged():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = {"kronops.kernels"}
    for folder, _, files in os.walk(os.path.join(ROOT, "kronops")):
        if "__init__.py" in files and "__pycache__" not in folder:
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    assert declared == found
