"""The native library: C++ CPU kernels (csrc/) registered for the CPU dispatch key of the
kronops ops, built by the root CMakeLists.txt against the installed torch.

``python -m kronops.native build`` builds it from a source checkout and puts
``libkronops_native.so`` beside this file; ``import kronops`` then loads it once every op of
the schema table (``kronops.native.schemas``) is defined. Without it (no compiler, a wheel
install) everything runs as before on the PyTorch kernels.

``KRONOPS_NATIVE`` (read at import): ``auto`` (default: load it when built), ``0`` (never),
``1`` (required: importing kronops raises if it cannot be loaded).
``available()``: whether it is loaded; ``load_error()``: why not; ``disabled()``: a context
in which CPU tensors take the PyTorch kernels again (tests and benchmarks compare both in
one process).
"""
import contextlib
import ctypes
import os
import sys
import threading
import warnings

from .schemas import SCHEMAS, op_names, schema

__all__ = ["SCHEMAS", "op_names", "schema", "library_path", "choice", "load", "available",
           "active", "load_error", "disabled"]

CHOICES = ("auto", "0", "1")
_lock = threading.Lock()
_lib = None            # the ctypes handle, once loaded
_error = None          # why it is not loaded
_active = False        # its kernels are registered now (not inside disabled())


def library_path() -> str:
    """Where ``python -m kronops.native build`` puts the library and the package looks for it."""
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "libkronops_native" + suffix)


def choice() -> str:
    """``KRONOPS_NATIVE``: auto, 0 or 1."""
    value = os.environ.get("KRONOPS_NATIVE", "auto")
    if value not in CHOICES:
        raise ValueError(f"KRONOPS_NATIVE must be one of {CHOICES}, got {value!r}")
    return value


def _register() -> str | None:
    error = _lib.kronops_native_register_cpu()
    if error is None:
        return None
    return error.decode(errors="replace").split("\nException raised from")[0]  # no C++ trace


def load() -> bool:
    """Load the library and register its kernels (once; the ops must be defined already).

    Returns whether it is loaded. ``KRONOPS_NATIVE=0`` skips it; a library that is not built
    is not an error unless ``KRONOPS_NATIVE=1``; one that is built but fails to load (built
    for another torch, say) warns with the reason and the command that rebuilds it.
    """
    global _lib, _error, _active
    with _lock:
        if _lib is not None or _error is not None:
            return _lib is not None
        wanted, path = choice(), library_path()
        if wanted == "0":
            _error = "turned off by KRONOPS_NATIVE=0"
        elif not os.path.exists(path):
            _error = f"not built ({path} is missing): run python -m kronops.native build"
        else:
            try:
                lib = ctypes.CDLL(path)
                lib.kronops_native_register_cpu.restype = ctypes.c_char_p
                lib.kronops_native_unregister_cpu.restype = None
                _lib = lib
                error = _register()
            except OSError as e:
                error = str(e)
            if error is None:
                _active = True
            else:
                _lib = None
                _error = (f"{path} failed to load: {error}; rebuild it for this torch with "
                          "python -m kronops.native build")
                if wanted == "auto":
                    warnings.warn(f"kronops native library: {_error}", RuntimeWarning,
                                  stacklevel=2)
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
