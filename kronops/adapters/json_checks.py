"""Structure checks of the JSON that adapter files and saved plans hold: a dict with exactly
the expected keys, an int that is not a bool, a finite number. Each failure is an
``AdapterFileError`` naming the place (``where``) and what differs."""
import math

from .errors import AdapterFileError


def is_int(value) -> bool:
    """An int that is not a bool (JSON true/false load as bools)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def expect_keys(where: str, data, keys) -> None:
    """``data`` is a dict with exactly ``keys``; else AdapterFileError naming what differs."""
    if not isinstance(data, dict):
        raise AdapterFileError(f"{where} must be a dict, got {type(data).__name__}")
    missing = sorted(set(keys) - set(data))
    unknown = sorted(set(data) - set(keys))
    if missing or unknown:
        raise AdapterFileError(f"{where}: " + "; ".join(
            ([f"missing key(s) {', '.join(map(repr, missing))}"] if missing else []) +
            ([f"unknown key(s) {', '.join(map(repr, unknown))}"] if unknown else [])))
