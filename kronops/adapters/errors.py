"""What a malformed adapter file or selection plan raises (``AdapterFileError``), and what a
file trained on another base model warns (``BaseMismatchWarning``)."""


class AdapterFileError(ValueError):
    """An adapter file (or a saved selection plan) that is malformed, corrupt or does not fit
    the model; raised before anything in the model changes."""


class BaseMismatchWarning(UserWarning):
    """An adapter file loaded into another base model than the one it was saved from (its
    fingerprint differs); ``load_adapters(..., strict=True)`` raises instead."""


__all__ = ["AdapterFileError", "BaseMismatchWarning"]
