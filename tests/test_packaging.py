"""Packaging and a fresh install: the wheel carries every subpackage, CI runs the README's test
command, both commands install the pinned versions, and nothing at the repository root
shadows an installed package (transformers imports Hugging Face's `kernels`)."""
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_subpackage_is_packaged():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "kronops")):
        if "__init__.py" in files and "__pycache__" not in folder:
            found.add(os.path.relpath(folder, ROOT).replace(os.sep, "."))
    assert declared == found


def _readme_commands() -> list[str]:
    """The one-line commands of the README's "The two commands" section."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    blocks = section.split("```bash\n")[1:]
    return [block.split("```", 1)[0].strip() for block in blocks]


def test_ci_runs_the_readme_test_command_verbatim():
    bench, tests = _readme_commands()
    assert "\n" not in bench and "\n" not in tests
    assert tests.startswith("python3 -m venv .venv-test") and tests.endswith("python -m pytest -q")
    assert bench.startswith("python3 -m venv .venv-bench") and bench.endswith("python -m bench")
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert tests in lines


def test_both_commands_build_the_native_library():
    for command in _readme_commands():
        assert "python -m kronops.native build &&" in command and "native]'" in command


def test_both_commands_install_the_constraints():
    """The environments are the ones CI was last green with: every pip install of the two
    commands takes constraints.txt (the --no-deps one pins its single package)."""
    for command in _readme_commands():
        installs = [part for part in command.split("&&") if "pip install" in part]
        assert installs
        for install in installs:
            assert "-c constraints.txt" in install or ("--no-deps" in install and "==" in install)


def test_constraints_pin_what_ci_depends_on():
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", pin) for pin in pins), pins
    names = {pin.split("==")[0].lower().replace("_", "-") for pin in pins}
    assert {"torch", "triton", "transformers", "peft", "kernels", "numpy", "safetensors",
            "huggingface-hub", "tokenizers", "pytest", "matplotlib"} <= names


def _root_import_names() -> set[str]:
    """What `import NAME` finds first at the repository root, which Python puts ahead of
    site-packages when run from there: regular packages and modules (a folder without
    __init__.py is only a namespace portion, which an installed package overrides)."""
    names = set()
    for entry in os.listdir(ROOT):
        path = os.path.join(ROOT, entry)
        if os.path.isfile(os.path.join(path, "__init__.py")):
            names.add(entry)
        elif entry.endswith(".py") and os.path.isfile(path):
            names.add(entry[:-3])
    return names


def test_no_root_name_shadows_an_installed_distribution():
    owners = importlib.metadata.packages_distributions()
    names = _root_import_names()
    assert "kronops" in names and "kernels" not in names
    shadowed = {name: owners[name] for name in names
                if set(owners.get(name, [])) - {"kronops"}}
    assert not shadowed, f"repository folders shadow installed packages: {shadowed}"


def test_kernels_from_the_repository_root_is_hugging_faces():
    """transformers >= 5.25 imports Hugging Face's `kernels`; run from the repository root, as
    `python -m pytest` and `python -m bench` are, it must still find the installed one."""
    try:
        installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels is not installed (pip install -e '.[test]')")
    run = subprocess.run([sys.executable, "-c", "import kernels, peft\n"
                          "from transformers import LlamaForCausalLM\nprint(kernels.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert os.path.samefile(run.stdout.strip(), installed)
