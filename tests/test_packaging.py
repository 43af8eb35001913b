"""The wheel carries every subpackage: pyproject's package list matches the source tree."""
import os
import tomllib

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
