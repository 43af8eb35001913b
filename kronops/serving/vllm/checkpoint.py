"""The served model's weights, read from its safetensors checkpoint without copying.

vLLM's CPU build repacks each linear layer's weight for its GEMM kernels and drops the
original (``weight`` is left empty), so the base weights an adapter file is checked
against (its fingerprint) and that in-place S²FT files are read against come from the
checkpoint vLLM loaded. Each tensor is a view of the file mapped copy-on-write: only the
pages read (the fingerprint's samples, an S²FT selection's rows or columns) are touched.
"""
import json
import mmap
import os
import struct

import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16}


def folder(model: str, revision: str | None = None) -> str:
    """The local folder of ``model`` (vLLM's model_config.model): itself, or its snapshot in
    the Hugging Face cache (never downloaded here)."""
    if os.path.isdir(model):
        return model
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(model, revision=revision, local_files_only=True)
    except Exception as e:
        raise FileNotFoundError(f"the served model {model!r} is neither a folder nor in the "
                                f"Hugging Face cache ({type(e).__name__}: {e})") from None


def weights(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in folder ``path``, by name, as views of the
    files mapped copy-on-write (fp64/32/16 and bf16 tensors; others are left out)."""
    found = {}
    for name in sorted(os.listdir(path)):
        if not name.endswith(".safetensors"):
            continue
        with open(os.path.join(path, name), "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (length,) = struct.unpack("<Q", mapped[:8])
        header = json.loads(mapped[8:8 + length])
        for key, entry in header.items():
            if key == "__metadata__" or entry["dtype"] not in DTYPES:
                continue
            dtype = DTYPES[entry["dtype"]]
            start, stop = entry["data_offsets"]
            count = (stop - start) // dtype.itemsize
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=8 + length + start)
            found[key] = flat.view(entry["shape"])
    return found
