"""What makes an example's results repeat exactly, shared by the examples.

``setup(threads)`` fixes everything a run controls: Python's and torch's generators are
seeded, torch uses deterministic algorithms, and the CPU runs a fixed number of threads
(the native library's chunked sums, and with them the results, depend on the count).
``environment()`` records what a run does not control but its results depend on: versions,
the CPU instruction set ATen's kernels use (AVX2 and AVX-512 round differently) and whether
the native library is loaded. ``write_json`` writes the results and the environment, which
two runs must reproduce exactly, and the timing and memory figures, which they need not,
under ``"timing"``.
"""
import json
import platform
import random
from importlib.metadata import PackageNotFoundError, version

import torch

THREADS = 2  # the published results' thread count


def add_threads_option(parser) -> None:
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"CPU threads (default {THREADS}; results depend on it)")


def setup(threads: int, seed: int = 0) -> None:
    """Seed Python's and torch's generators, use deterministic algorithms, run ``threads``
    CPU threads."""
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def environment(packages=("torch", "transformers")) -> dict:
    """The versions of Python, kronops and ``packages``, the CPU instruction set, the thread
    count and whether kronops' native library is loaded."""
    import kronops

    versions = {}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return dict(python=platform.python_version(), kronops=kronops.__version__, **versions,
                cpu_capability=torch.backends.cpu.get_cpu_capability(),
                threads=torch.get_num_threads(), native=kronops.native.available())


def write_json(path: str, results: dict, timing: dict, **environment_options) -> None:
    """``{"results", "environment", "timing"}`` to ``path``: everything but ``timing`` is
    the same in every run of the same command on the same machine."""
    with open(path, "w") as f:
        json.dump(dict(results=results, environment=environment(**environment_options),
                       timing=timing), f, indent=1, ensure_ascii=False)
        f.write("\n")
