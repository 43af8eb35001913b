"""The adapter file format: one safetensors file, its tensors and, in the header metadata
under "kronops", a JSON config. ``encode`` makes a file's bytes; ``read_adapters`` reads one
back, checked for integrity and structure (not yet against a model: ``files``).

The config: format ("kronops-adapters"), format_version (3), kronops_version, method,
train_modules, tensors ({name: {shape, dtype}}), base (the base model's ``fingerprint``, or
null), sha256, and the method's own keys (``FILE_KEYS`` of its module in ``methods``:
"layers" for the KronA family, "plan" and "mode" for S²FT). Tensors are named by module
name in the model: the method's (see its module), and ``<module>.<parameter>`` of each
train module. Files of format version 2 (kronops before fingerprints) have no "base".

Integrity: ``sha256`` (``checksum``) covers every byte that affects results: the config
(every key but sha256 itself, as canonical JSON: sorted keys, no spaces, ASCII; the base
fingerprint included) and every tensor (name, dtype, shape, bytes), each length-prefixed. A
changed digit anywhere in the config or the data fails the check.

Other kronops files (curvature factors) use the same container, checksum and checks under
their own ``FileKind``: ``encode(..., kind)`` and ``read_file(path, kind, check)``.
"""
import dataclasses
import hashlib
import json
import os
import struct

import torch

from ..version import __version__
from .errors import AdapterFileError, naming
from .fingerprint import check_fingerprint
from .json_checks import expect_keys
from .methods import METHODS

FORMAT = "kronops-adapters"
FORMAT_VERSION = 3  # 2: one layout for every method (S²FT plan + mode); 3: + base fingerprint
READ_VERSIONS = (2, 3)


@dataclasses.dataclass(frozen=True)
class FileKind:
    """A kind of kronops safetensors file: its config's ``format`` and version (written),
    the versions read, what messages call it ("a kronops <noun> file") and what writes it."""
    format: str
    version: int
    read_versions: tuple[int, ...]
    noun: str
    writer: str


ADAPTERS = FileKind(FORMAT, FORMAT_VERSION, READ_VERSIONS, "adapter", "save_adapters")
COMMON_KEYS = ("format", "format_version", "kronops_version", "method", "train_modules",
               "tensors", "sha256")


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def _canonical(config: dict) -> bytes:
    """The config without its sha256, as canonical JSON bytes (sorted keys, no spaces,
    ASCII; NaN/Infinity refused)."""
    body = {k: v for k, v in config.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def checksum(config: dict, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of an adapter file's content: the canonical config (every key but
    sha256) and, by sorted name, each tensor's name, dtype, shape and bytes, every field
    length-prefixed. ValueError/TypeError if the config is not plain finite JSON."""
    h = hashlib.sha256()

    def field(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    field(b"kronops-adapters")
    field(_canonical(config))
    for key in sorted(tensors):
        t = tensors[key]
        field(key.encode("utf-8"))
        field(dtype_name(t).encode())
        field(json.dumps(list(t.shape)).encode())
        data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(data.nbytes.to_bytes(8, "little"))
        h.update(data.tobytes() if not data.flags.c_contiguous else data)
    return h.hexdigest()


def encode(content: dict, tensors: dict[str, torch.Tensor], kind: FileKind = ADAPTERS) -> bytes:
    """A file's bytes: ``tensors`` (contiguous, on the CPU) and a config of ``content`` (for
    adapters: method, train_modules, base and the method's keys) with the kind's format and
    version, kronops' version, the tensor list and the checksum."""
    from safetensors.torch import save
    config = dict(format=kind.format, format_version=kind.version, kronops_version=__version__,
                  **content)
    config["tensors"] = {k: dict(shape=list(t.shape), dtype=dtype_name(t))
                         for k, t in tensors.items()}
    config["sha256"] = checksum(config, tensors)
    return save(tensors, metadata={"kronops": json.dumps(config, sort_keys=True)})


def _decode(data: bytes, kind: FileKind) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) of a file's bytes, the config a JSON object of ``kind``'s format in
    a readable version; AdapterFileError for anything else."""
    from safetensors.torch import load
    if len(data) >= 8 and data[8:9] != b"{":  # a safetensors header is a JSON object
        raise AdapterFileError(f"is not a kronops {kind.noun} file (not safetensors: it "
                               f"starts with {data[:9]!r}, not an 8-byte length and a JSON "
                               f"header); {kind.writer} writes them (torch.save does not)",
                               whole_file=True)
    try:
        if len(data) < 8:
            raise ValueError(f"{len(data)} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", data[:8])
        if 8 + n > len(data):
            raise ValueError(f"header of {n} bytes, file of {len(data)}")
        header = json.loads(data[8:8 + n])
        tensors = load(data)
    except Exception as e:  # struct.error, JSON errors, SafetensorError
        raise AdapterFileError(f"is not a valid {kind.noun} file (truncated or corrupt): "
                               f"{type(e).__name__}: {e}", whole_file=True) from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    text = metadata.get("kronops") if isinstance(metadata, dict) else None
    if not isinstance(text, str):
        raise AdapterFileError(f"is a safetensors file without a kronops {kind.noun} config",
                               whole_file=True)
    try:
        config = json.loads(text)
    except ValueError as e:
        raise AdapterFileError(f"the kronops config is not valid JSON (corrupt): {e}") from None
    if not isinstance(config, dict):
        raise AdapterFileError("the kronops config is not a JSON object (corrupt)")
    if config.get("format") != kind.format or \
            config.get("format_version") not in kind.read_versions:
        raise AdapterFileError(f"unsupported format {config.get('format')!r} version "
                               f"{config.get('format_version')!r} (this kronops reads "
                               f"{kind.format!r} versions {kind.read_versions})")
    return tensors, config


def _check_integrity(config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The checksum fits the config and the tensors; else AdapterFileError."""
    try:
        digest = checksum(config, tensors)
    except (TypeError, ValueError) as e:
        raise AdapterFileError(f"the kronops config is not plain JSON (corrupt): {e}") from None
    if digest != config.get("sha256"):
        raise AdapterFileError("config or tensor data does not match its checksum (corrupt)")


def _check_structure(config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """The config's structure: every key present, of its type, nothing unknown (the method's
    keys by its ``check_file``); the tensor list matching the file's tensors exactly.
    AdapterFileError naming what is wrong."""
    name = config.get("method")
    if not isinstance(name, str) or name not in METHODS:
        raise AdapterFileError(f"unknown method {name!r} (expected one of {tuple(METHODS)})")
    method = METHODS[name]
    versioned = ("base",) if config["format_version"] >= 3 else ()
    expect_keys("config", config, COMMON_KEYS + method.FILE_KEYS + versioned)
    check_listed(config, tensors)
    train = config["train_modules"]
    if not isinstance(train, list) or not all(isinstance(n, str) and n for n in train) or \
            len(set(train)) != len(train):
        raise AdapterFileError(f"train_modules must be a list of distinct module names, "
                               f"got {train!r}")
    check_fingerprint(config.get("base"))
    method.check_file(config)


def check_listed(config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """What every kronops file's config holds beside its own keys: kronops_version a str,
    and the tensor list matching the file's tensors exactly; else AdapterFileError."""
    if not isinstance(config["kronops_version"], str):
        raise AdapterFileError(f"kronops_version must be a str, "
                               f"got {config['kronops_version']!r}")
    listed = config["tensors"]
    if not isinstance(listed, dict) or set(listed) != set(tensors):
        raise AdapterFileError("the config's tensor list differs from the tensors in the file")
    for key, t in tensors.items():
        if listed[key] != dict(shape=list(t.shape), dtype=dtype_name(t)):
            raise AdapterFileError(f"{key} is listed as {listed[key]!r}, the file holds shape "
                                   f"{list(t.shape)} dtype {dtype_name(t)}")


def read_file(path, kind: FileKind, check) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) from a kronops file of ``kind``, checked for integrity (checksum
    over config and tensors) and by ``check(config, tensors)``; ``AdapterFileError`` naming
    the file and the problem if not."""
    path = os.fspath(path)
    with naming(path):
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise AdapterFileError(f"cannot read {kind.noun} file: {e}") from e
        tensors, config = _decode(data, kind)
        _check_integrity(config, tensors)
        check(config, tensors)
    return tensors, config


def read_adapters(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, config) from an adapter file, checked for integrity and structure."""
    return read_file(path, ADAPTERS, _check_structure)


__all__ = ["FORMAT", "FORMAT_VERSION", "READ_VERSIONS", "FileKind", "ADAPTERS", "checksum",
           "encode", "read_file", "read_adapters", "check_listed"]
