"""What a malformed adapter file or selection plan raises (``AdapterFileError``), what a
file trained on another base model warns (``BaseMismatchWarning``), and the one place that
puts a file's path into the message (``naming``).

The checks of a file's content do not know where it came from: they raise
``AdapterFileError`` about a part of it ("layers: ...") or about the file as a whole
(``whole_file=True``: "is not a kronops adapter file"), and whoever opened the file wraps
them in ``with naming(path):``, which puts the path in front.
"""
import contextlib
import os


class AdapterFileError(ValueError):
    """An adapter file (or a saved selection plan) that is malformed, corrupt or does not fit
    the model; raised before anything in the model changes. ``whole_file``: the message is
    said of the file itself (its path goes in front as the subject, not as a label)."""

    def __init__(self, message: str, *, whole_file: bool = False):
        super().__init__(message)
        self.whole_file = whole_file

    def about(self, path) -> "AdapterFileError":
        """The same error with the file's ``path`` in front: "'a.safetensors' is ..." for a
        whole-file message, "'a.safetensors': ..." for any other."""
        separator = " " if self.whole_file else ": "
        return AdapterFileError(f"{os.fspath(path)!r}{separator}{self}")


@contextlib.contextmanager
def naming(path):
    """``with naming(path):`` an ``AdapterFileError`` raised inside leaves with ``path`` in
    its message (``AdapterFileError.about``); its cause is kept."""
    try:
        yield
    except AdapterFileError as e:
        raise e.about(path) from e.__cause__


class BaseMismatchWarning(UserWarning):
    """An adapter file loaded into another base model than the one it was saved from (its
    fingerprint differs); ``load_adapters(..., strict=True)`` raises instead."""


__all__ = ["AdapterFileError", "BaseMismatchWarning", "naming"]
