"""Build the native library with CMake against the installed torch, and install it into the
package (``python -m kronops.native build``).

The build runs in the current environment (no isolated build environment, so no second
torch is downloaded), from a source checkout: CMakeLists.txt and csrc/ beside the kronops
package. It needs a C++20 compiler and cmake (ninja when present): the environment's own
(``pip install -e '.[native]'``) before those on PATH. The fresh library is
then loaded in a new process, so a build that cannot be loaded fails here, not at import.
Both the build folder (``build/native/<build key>``) and the installed library
(``kronops/native/lib/<build key>/``, with ``torch-build.json``) are per torch build, so
environments sharing a checkout each build and load their own.
"""
import json
import os
import shutil
import subprocess
import sys
import time

from . import LIBRARY_NAME, STAMP_NAME, build_key, library_dir, library_path, torch_build

RUNNER = "kronops_aoti_runner"


def source_root() -> str:
    """The checkout holding CMakeLists.txt and csrc/ (the parent of the kronops package)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not (os.path.isfile(os.path.join(root, "CMakeLists.txt"))
            and os.path.isdir(os.path.join(root, "csrc"))):
        raise RuntimeError(f"the native library builds from a source checkout (CMakeLists.txt "
                           f"and csrc/ beside the kronops package); none at {root}")
    return root


def default_build_dir() -> str:
    """``build/native/<build key>`` in the checkout: one CMake tree per torch build."""
    return os.path.join(source_root(), "build", "native", build_key())


def runner_path(build_dir: str | None = None) -> str:
    """The C++ program that runs AOTInductor packages, as the build leaves it."""
    return os.path.join(build_dir or default_build_dir(), RUNNER)


def _run(command, log):
    log.write("$ " + " ".join(command) + "\n")
    log.flush()
    done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed (exit {done.returncode})")


def install(built: str) -> str:
    """Copy the library ``built`` into this torch build's folder of the package with its stamp
    (``torch-build.json``, written first); returns the installed path."""
    os.makedirs(library_dir(), exist_ok=True)
    with open(os.path.join(library_dir(), STAMP_NAME), "w") as f:
        json.dump(torch_build(), f, indent=1)
    target = library_path()
    staged = target + ".tmp"
    shutil.copy2(built, staged)
    os.replace(staged, target)  # a process that has the old one loaded keeps it
    return target


def build(build_dir: str | None = None, jobs: int | None = None, quiet: bool = False) -> str:
    """Configure and build with CMake, install the library into the package, check that it loads.

    Returns the installed library's path. On failure raises RuntimeError, with the build
    log's tail in the message.
    """
    import torch

    root = source_root()
    build_dir = os.path.abspath(build_dir or default_build_dir())
    here = os.path.dirname(sys.executable)  # the environment's own cmake/ninja come first
    cmake = shutil.which("cmake", path=here) or shutil.which("cmake")
    ninja = shutil.which("ninja", path=here) or shutil.which("ninja")
    if cmake is None:
        raise RuntimeError("cmake not found (pip install cmake, or cmake >= 3.18 on PATH)")
    os.makedirs(build_dir, exist_ok=True)
    log_path = os.path.join(build_dir, "build.log")
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja and not os.path.exists(
        os.path.join(build_dir, "Makefile")) else []
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            _run([cmake, "-S", root, "-B", build_dir, *generator, "-DCMAKE_BUILD_TYPE=Release",
                  f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                  f"-DPython3_EXECUTABLE={sys.executable}"], log)
            _run([cmake, "--build", build_dir, "--parallel", str(jobs or os.cpu_count() or 1)], log)
        except RuntimeError as e:
            log.flush()
            with open(log_path) as f:
                tail = "".join(f.readlines()[-40:])
            raise RuntimeError(f"{e}; the last lines of {log_path}:\n{tail}") from None
    target = install(os.path.join(build_dir, LIBRARY_NAME))
    check = subprocess.run(
        [sys.executable, "-c", "import kronops, kronops.native as n; "
         "assert n.available(), n.load_error()"],
        env={**os.environ, "KRONOPS_NATIVE": "1"}, capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"built {target}, but it does not load:\n{check.stderr[-2000:]}")
    if not quiet:
        print(f"kronops native library: built in {time.perf_counter() - start:.0f} s and "
              f"loaded: {target} (C++ runner: {runner_path(build_dir)}; log: {log_path})")
    return target
