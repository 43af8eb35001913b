"""The benchmark's optional packages: "not installed" only when the package is absent; an
installed package that fails to import is reported with its own error, not skipped as absent."""
import os
import subprocess
import sys

import pytest

from bench.optional import optional_import

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _package(folder, name, source):
    (folder / name).mkdir()
    (folder / name / "__init__.py").write_text(source)


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """A folder first on sys.path holding the packages a test writes (forgotten afterwards)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("kronops_probe_")]:
        del sys.modules[name]
    optional_import.cache_clear()


def test_absent_package_is_not_installed(packages):
    assert optional_import("kronops_probe_absent") == (None, "kronops_probe_absent is not installed")
    assert optional_import("kronops_probe_absent.sub")[1] == "kronops_probe_absent is not installed"


def test_broken_package_reports_its_own_error(packages):
    _package(packages, "kronops_probe_broken",
             "raise ImportError(\"cannot import name 'CUDAProperties' from 'kernels'\")")
    module, why = optional_import("kronops_probe_broken")
    assert module is None and "not installed" not in why
    assert why == ("kronops_probe_broken failed to import: ImportError: cannot import name "
                   "'CUDAProperties' from 'kernels'")


def test_missing_dependency_is_not_the_package_missing(packages):
    _package(packages, "kronops_probe_needs", "import kronops_probe_dependency")
    module, why = optional_import("kronops_probe_needs")
    assert module is None
    assert why.startswith("kronops_probe_needs failed to import: ModuleNotFoundError")
    assert "kronops_probe_dependency" in why


def test_lazy_package_is_checked_by_the_names_used(packages):
    _package(packages, "kronops_probe_lazy", "def __getattr__(name):\n"
             "    raise RuntimeError(f'importing {name} failed')\nready = True\n")
    module, why = optional_import("kronops_probe_lazy")
    assert module is not None and why is None
    module, why = optional_import("kronops_probe_lazy", "ready", "Model")
    assert module is None and why.endswith("RuntimeError: importing Model failed")


def test_bench_names_the_cause_of_a_broken_optional_package(tmp_path):
    """What a shadowed dependency looked like: a `kernels` without CUDAProperties first on the
    path breaks transformers and peft; the benchmark says so instead of "not installed"."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    _package(tmp_path, "kernels", "")
    run = subprocess.run([sys.executable, "-c", "from bench.optional import skipped\n"
                          "print('\\n'.join(skipped()))"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), ROOT])})
    assert run.returncode == 0, run.stderr
    lines = {line.split(" rows are skipped: ")[0]: line for line in run.stdout.splitlines()}
    for rows in ("the LLaMA training-step and serving", "the PEFT LoKr/LoRA"):
        assert "failed to import" in lines[rows] and "kernels" in lines[rows], run.stdout
