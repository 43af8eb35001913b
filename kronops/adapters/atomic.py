"""Writing an adapter (or other kronops) file atomically: ``write_atomic(path, data)``.

The data goes to a temporary file in the same directory
(``.<name>.<host>.<pid>.<random>.kronops-tmp``), flushed to disk and moved over ``path`` with
``os.replace`` (then the directory is flushed too), so a crash mid-write leaves any previous
file intact; on any error the temporary file is removed. A process killed mid-write
(SIGKILL) cannot clean up: the next write to the same path removes such leftovers (those of
a process that is no longer running on this host, or older than ``STALE_TMP_S``). The file
is created with the mode the umask gives (0666 & ~umask), like any file a program creates.
A missing directory, or ``path`` being a directory, raises before anything is written,
naming ``path``; every error names ``path``, never the temporary file.
"""
import errno
import os
import secrets
import socket
import time

TMP_SUFFIX = ".kronops-tmp"
STALE_TMP_S = 15 * 60  # a temporary file this old is stale even if its pid is in use


def host_name() -> str:
    """This host's name as temporary file names hold it (letters, digits, "-" and "_")."""
    name = socket.gethostname() or "host"
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _tmp_prefix(base: str) -> str:
    return f".{base}."


def _tmp_owner(base: str, entry: str):
    """(host, pid) of a temporary file ``entry`` that a save to ``base`` made, else None."""
    prefix = _tmp_prefix(base)
    if not (entry.startswith(prefix) and entry.endswith(TMP_SUFFIX)):
        return None
    parts = entry[len(prefix):-len(TMP_SUFFIX)].split(".")
    if len(parts) != 3 or not parts[1].isdigit() or len(parts[2]) != 16 or \
            any(c not in "0123456789abcdef" for c in parts[2]):
        return None
    return parts[0], int(parts[1])


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (assumed so where it cannot be told)."""
    if os.name != "posix":  # on Windows os.kill(pid, 0) would terminate the process
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


_WRITING: set[str] = set()  # temporary files this process is writing now


def _sweep(directory: str, base: str) -> None:
    """Remove stale temporary files of earlier saves to ``base`` in ``directory``: those of
    a process no longer running on this host, or older than STALE_TMP_S (a reused pid,
    another host). Errors are ignored (it is housekeeping)."""
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    host, now = host_name(), time.time()
    for entry in entries:
        owner = _tmp_owner(base, entry)
        full = os.path.join(directory, entry)
        if owner is None or full in _WRITING:
            continue
        try:
            age = now - os.lstat(full).st_mtime
            dead = owner[0] == host and (owner[1] == os.getpid() or not _pid_alive(owner[1]))
            if dead or age > STALE_TMP_S:
                os.remove(full)
        except OSError:
            pass


def _save_error(e: OSError, path: str, what: str) -> OSError:
    """The same kind of error, about the user's ``path`` (not the temporary file)."""
    reason = e.strerror if e.errno is not None and e.strerror else str(e)
    message = f"cannot save {what} to {path!r}: {reason}"
    try:
        return type(e)(e.errno, message) if e.errno is not None else type(e)(message)
    except TypeError:
        return OSError(message)


def _check_target(path: str, what: str) -> str:
    """The directory ``path`` goes into; a clear error naming ``path`` if it cannot be a file."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, f"cannot save {what} to {path!r}: it is a "
                                "directory; give a file path, e.g. "
                                f"{os.path.join(path, what + '.safetensors')!r}")
    if not os.path.isdir(directory):
        state = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise FileNotFoundError(errno.ENOENT, f"cannot save {what} to {path!r}: directory "
                                f"{directory!r} {state} (create it first)")
    return directory


def _create_temporary(directory: str, base: str, path: str, what: str) -> tuple[str, int]:
    """(name, descriptor) of a new temporary file for ``path``, registered in _WRITING."""
    while True:
        tmp = os.path.join(directory, f"{_tmp_prefix(base)}{host_name()}.{os.getpid()}."
                                      f"{secrets.token_hex(8)}{TMP_SUFFIX}")
        _WRITING.add(tmp)  # before it exists: a concurrent sweep in this process skips it
        try:
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL |
                                getattr(os, "O_CLOEXEC", 0), 0o666)  # the umask decides the mode
        except FileExistsError:
            _WRITING.discard(tmp)
        except OSError as e:
            _WRITING.discard(tmp)
            raise _save_error(e, path, what) from e


def _sync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable, where the system allows it."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_atomic(path, data: bytes, *, what: str = "adapters") -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring): temporary file,
    fsync, os.replace, fsync of the directory; the temporary file is removed on any error.
    Errors say "cannot save <what> to <path>"."""
    path = os.fspath(path)
    directory = _check_target(path, what)
    base = os.path.basename(path)
    _sweep(directory, base)
    tmp, fd = _create_temporary(directory, base, path, what)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.remove(tmp)
            except OSError:
                pass
            raise
    except OSError as e:
        raise _save_error(e, path, what) from e
    finally:
        _WRITING.discard(tmp)
    _sync_directory(directory)
