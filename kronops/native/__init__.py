"""The native library: C++ CPU kernels (csrc/) registered for the CPU dispatch key of the
kronops ops, built by the root CMakeLists.txt against the installed torch.

``python -m kronops.native build`` builds it from a source checkout and puts
``libkronops_native.so`` in ``lib/<build key>/`` beside this file, with ``torch-build.json``
naming the torch it was built against: one library per torch build (Python, torch version and
commit, C++ ABI, machine, where that torch is installed), so environments sharing a checkout
never load each other's. ``import kronops`` then loads the one for this environment's torch
once every op of the op table (``kronops.native.schemas``) is defined, and refuses one
whose ``torch-build.json`` names another torch. Without it (no compiler, a wheel install)
everything runs as before on the PyTorch kernels.

``KRONOPS_NATIVE`` (read at import): ``auto`` (default: load it when built), ``0`` (never),
``1`` (required: importing kronops raises if it cannot be loaded).
``available()``: whether it is loaded; ``load_error()``: why not; ``disabled()``: a context
in which CPU tensors take the PyTorch kernels again (tests and benchmarks compare both in
one process).

``KRONOPS_CPU_ISA`` (read when the library loads): the instruction-set level its kernels use,
at most the one the CPU has (``detected_isa()``; a higher or unknown one is a ValueError),
so that every path can be tested on one machine: ``amx`` or ``avx512`` (bf16 products on
torch's bf16 GEMMs where the CPU has AMX-BF16 or AVX512-BF16, fp32 accumulation), ``avx2``
(bf16 computed in fp32; the AVX2 FMA kernel of the per-row products, as at the levels
above), ``portable`` (BLAS calls only), or ``auto`` (default: the detected level). ``cpu_isa()`` is the level in use;
``forced_isa(level)`` lowers it inside a context.
"""
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import sys
import threading
import warnings

from .schemas import SCHEMAS, op_names, schema

__all__ = ["SCHEMAS", "op_names", "schema", "torch_build", "build_key", "library_dir",
           "library_path", "build_mismatch", "choice", "load", "available", "active",
           "load_error", "disabled", "ISAS", "isa_choice", "detected_isa", "cpu_isa",
           "forced_isa", "bf16_products"]

CHOICES = ("auto", "0", "1")
ISAS = ("portable", "avx2", "avx512", "amx")  # lowest first: a level includes those below
_lock = threading.Lock()
_lib = None            # the ctypes handle, once loaded
_error = None          # why it is not loaded
_active = False        # its kernels are registered now (not inside disabled())
_bf16_products = False  # bf16_products(), refreshed whenever the level is set


LIBRARY_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib")
LIBRARY_NAME = "libkronops_native" + (".dylib" if sys.platform == "darwin" else ".so")
STAMP_NAME = "torch-build.json"
REBUILD = "rebuild it for this environment with python -m kronops.native build"


def torch_build() -> dict:
    """What a native library must be built against to load here: this Python, this torch
    (version, commit, C++ ABI, install folder) on this machine."""
    import torch

    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "torch": torch.__version__, "torch_commit": torch.version.git_version,
            "cxx11_abi": bool(torch.compiled_with_cxx11_abi()), "machine": platform.machine(),
            "torch_dir": os.path.dirname(os.path.abspath(torch.__file__))}


def build_key(build: dict | None = None) -> str:
    """The folder name of one torch build's library: readable, then a digest of every field
    of ``torch_build()``, e.g. ``py3.11-torch2.13.0+cpu-1a2b3c4d5e6f``."""
    build = build or torch_build()
    digest = hashlib.sha256(json.dumps(build, sort_keys=True).encode()).hexdigest()[:12]
    return f"py{build['python']}-torch{build['torch']}-{digest}"


def library_dir() -> str:
    """Where ``python -m kronops.native build`` puts this environment's library and stamp."""
    return os.path.join(LIBRARY_ROOT, build_key())


def library_path() -> str:
    """The library this environment builds and loads."""
    return os.path.join(library_dir(), LIBRARY_NAME)


def build_mismatch(directory: str) -> str | None:
    """Why the library in ``directory`` must not be loaded into this process (its stamp is
    missing or names another torch build), or None when it was built for this one."""
    stamp = os.path.join(directory, STAMP_NAME)
    try:
        with open(stamp) as f:
            built = json.load(f)
    except (OSError, ValueError) as e:
        return f"{stamp} cannot be read ({e}); {REBUILD}"
    here = torch_build()
    if built == here:
        return None
    differ = ", ".join(f"{k} {built.get(k)!r} (here {v!r})" for k, v in here.items()
                       if built.get(k) != v)
    return f"{directory} was built against another torch: {differ}; {REBUILD}"


def _not_built() -> str:
    others = sorted(os.listdir(LIBRARY_ROOT)) if os.path.isdir(LIBRARY_ROOT) else []
    built = f" (built only for: {', '.join(others)})" if others else ""
    return (f"not built for this torch ({library_path()} is missing{built}): run "
            "python -m kronops.native build")


def choice() -> str:
    """``KRONOPS_NATIVE``: auto, 0 or 1."""
    value = os.environ.get("KRONOPS_NATIVE", "auto")
    if value not in CHOICES:
        raise ValueError(f"KRONOPS_NATIVE must be one of {CHOICES}, got {value!r}")
    return value


def isa_choice() -> str:
    """``KRONOPS_CPU_ISA``: auto or one of ``ISAS``."""
    value = os.environ.get("KRONOPS_CPU_ISA", "auto")
    if value != "auto" and value not in ISAS:
        raise ValueError(f"KRONOPS_CPU_ISA must be auto or one of {ISAS}, got {value!r}")
    return value


def _loaded():
    if _lib is None:
        raise RuntimeError(f"kronops native library: not loaded ({_error})")
    return _lib


def detected_isa() -> str:
    """The highest level of ``ISAS`` this CPU supports (the native library's cpuid check)."""
    return ISAS[_loaded().kronops_native_detected_isa()]


def cpu_isa() -> str:
    """The level of ``ISAS`` the native kernels use now."""
    return ISAS[_loaded().kronops_native_cpu_isa()]


def bf16_products() -> bool:
    """Whether the native kernels compute bf16 on torch's bf16 GEMMs now (level avx512 or amx,
    the CPU having AVX512-BF16 or AMX-BF16), rather than in fp32; False when not loaded. A
    Python value, refreshed whenever the level is set, so compiled code can read it."""
    return _bf16_products


def _level_set():
    global _bf16_products
    _bf16_products = bool(_lib.kronops_native_bf16_products())


def _force_isa(level: str, source: str):
    if level not in ISAS:
        raise ValueError(f"{source} must be one of {ISAS}, got {level!r}")
    if _loaded().kronops_native_force_isa(ISAS.index(level)) != 0:
        raise ValueError(f"{source} is {level!r}, but this CPU supports at most "
                         f"{detected_isa()!r} (levels, lowest first: {ISAS})")
    _level_set()


@contextlib.contextmanager
def forced_isa(level: str):
    """Inside, the native kernels use ``level`` (one of ``ISAS``, at most ``detected_isa()``);
    the level before is restored on exit. Process-wide, not per thread."""
    before = cpu_isa()
    _force_isa(level, "level")
    try:
        yield
    finally:
        _force_isa(before, "level")


def _register() -> str | None:
    error = _lib.kronops_native_register_cpu()
    if error is None:
        return None
    return error.decode(errors="replace").split("\nException raised from")[0]  # no C++ trace


def _open(path: str) -> str | None:
    """Open the library at ``path``, set its instruction-set level (``KRONOPS_CPU_ISA``) and
    register its kernels; why it failed, or None. A level the CPU lacks raises ValueError."""
    global _lib, _active
    try:
        lib = ctypes.CDLL(path)
        for name in ("kronops_native_detected_isa", "kronops_native_cpu_isa",
                     "kronops_native_bf16_products"):
            getattr(lib, name).restype = ctypes.c_int
        lib.kronops_native_force_isa.argtypes = [ctypes.c_int]
        lib.kronops_native_force_isa.restype = ctypes.c_int
        lib.kronops_native_register_cpu.restype = ctypes.c_char_p
        lib.kronops_native_unregister_cpu.restype = None
    except (OSError, AttributeError) as e:  # AttributeError: a library from older sources
        return f"{path} failed to load: {e}; {REBUILD}"
    _lib = lib
    _level_set()
    try:
        if isa_choice() != "auto":
            _force_isa(isa_choice(), "KRONOPS_CPU_ISA")
    except ValueError:
        _lib = None
        raise
    error = _register()
    if error is None:
        _active = True
        return None
    _lib = None
    return f"{path} failed to load: {error}; {REBUILD}"


def load() -> bool:
    """Load the library and register its kernels (once; the ops must be defined already).

    Returns whether it is loaded. ``KRONOPS_NATIVE=0`` skips it; a library that is not built
    for this torch is not an error unless ``KRONOPS_NATIVE=1``; one that is refused (its stamp
    names another torch build: it is never opened) or fails to load warns with the reason and
    the command that rebuilds it.
    """
    global _error
    with _lock:
        if _lib is not None or _error is not None:
            return _lib is not None
        wanted, path = choice(), library_path()
        isa_choice()  # a bad KRONOPS_CPU_ISA is an error even where nothing loads
        if wanted == "0":
            _error = "turned off by KRONOPS_NATIVE=0"
        elif not os.path.exists(path):
            _error = _not_built()
        else:
            _error = build_mismatch(os.path.dirname(path)) or _open(path)
            if _error is not None and wanted == "auto":
                warnings.warn(f"kronops native library: {_error}", RuntimeWarning, stacklevel=2)
        if _error is not None and wanted == "1":
            raise RuntimeError(f"KRONOPS_NATIVE=1 but the native library is {_error}")
        return _lib is not None


def available() -> bool:
    """Whether the native library is loaded (its kernels serve CPU tensors outside ``disabled()``)."""
    return _lib is not None


def active() -> bool:
    """Whether CPU tensors take the native kernels right now."""
    return _active


def load_error() -> str | None:
    """Why the library is not loaded (None when it is, or before the package tried)."""
    return _error


@contextlib.contextmanager
def disabled():
    """Inside, CPU tensors run the ops' PyTorch kernels (the native ones are unregistered, and
    registered again on exit). A no-op when the library is not loaded. Not thread-safe
    against ops running concurrently in other threads."""
    global _active
    with _lock:
        was = _active
        if was:
            _lib.kronops_native_unregister_cpu()
            _active = False
    try:
        yield
    finally:
        with _lock:
            if was:
                error = _register()
                if error is not None:
                    raise RuntimeError(f"kronops native library: registering again failed: {error}")
                _active = True
