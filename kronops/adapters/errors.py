"""The one error a malformed adapter file or selection plan raises: ``AdapterFileError``."""


class AdapterFileError(ValueError):
    """An adapter file (or a saved selection plan) that is malformed, corrupt or does not fit
    the model; raised before anything in the model changes."""


__all__ = ["AdapterFileError"]
