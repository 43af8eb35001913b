"""Export a small KronA + S²FT model, compile it with AOTInductor, and write its inputs and
Python's outputs, for ``kronops_aoti_runner`` (tests/native/test_native_aoti.py runs both):

    python csrc/runner/export_model.py OUT_DIR
    build/native/<build key>/kronops_aoti_runner OUT_DIR/model.pt2 OUT_DIR/inputs.krt OUT_DIR/outputs.krt
    (``python -m kronops.native status`` prints the runner's path)

The model (fp32, CPU): a KronALinear (rank-decomposed A), a GELU, an S²FTLinear training
rows given as an index, a GELU, an S²FTLinear training a range of columns. Every adapter is
non-zero, so each op changes the output. The compiled package calls the kronops ops through
the dispatcher; the C++ program defines their schemas and registers their CPU kernels
from the native library.
"""
import math
import os
import struct
import sys

import torch
import torch.nn.functional as F
from torch import nn

import kronops

DTYPE_CODES = {torch.float32: 0, torch.float64: 1}


class KronS2FTModel(nn.Module):
    """in 48 -> KronA 64 -> S²FT rows 40 -> S²FT cols 24."""

    def __init__(self):
        super().__init__()
        self.krona = kronops.KronALinear(nn.Linear(48, 64), a_shape=(8, 6), rank=3, alpha=6.0)
        self.rows = kronops.S2FTLinear(nn.Linear(64, 40), rows=torch.tensor([1, 4, 5, 17, 30, 39]))
        self.cols = kronops.S2FTLinear(nn.Linear(40, 24), cols=range(7, 16))
        with torch.no_grad():
            for p in (self.krona.b, self.rows.delta, self.cols.delta):
                p.normal_(std=0.1)

    def forward(self, x):
        return self.cols(F.gelu(self.rows(F.gelu(self.krona(x)))))


def write_tensors(path: str, tensors) -> None:
    """The runner's tensor file: b"KRT1", count, then per tensor dtype code, ndim, sizes, data."""
    with open(path, "wb") as f:
        f.write(b"KRT1" + struct.pack("<q", len(tensors)))
        for t in tensors:
            t = t.detach().contiguous().cpu()
            f.write(struct.pack("<qq", DTYPE_CODES[t.dtype], t.dim()))
            f.write(struct.pack(f"<{t.dim()}q", *t.shape))
            f.write(t.numpy().tobytes())


def read_tensors(path: str) -> list[torch.Tensor]:
    """Tensors from a file ``write_tensors`` (or the runner) wrote."""
    codes = {v: k for k, v in DTYPE_CODES.items()}
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"KRT1":
        raise ValueError(f"{path}: not a tensor file")
    (count,), pos, out = struct.unpack_from("<q", data, 4), 12, []
    for _ in range(count):
        code, ndim = struct.unpack_from("<qq", data, pos)
        shape = struct.unpack_from(f"<{ndim}q", data, pos + 16)
        pos += 16 + 8 * ndim
        dtype, count = codes[code], math.prod(shape)
        nbytes = count * dtype.itemsize
        out.append(torch.frombuffer(bytearray(data[pos:pos + nbytes]), dtype=dtype).reshape(shape)
                   if count else torch.empty(shape, dtype=dtype))
        pos += nbytes
    return out


def export(out_dir: str, batch: int = 5, seq: int = 7) -> str:
    """Compile the model into OUT_DIR/model.pt2; write inputs.krt and expected.krt."""
    torch.manual_seed(0)
    model = KronS2FTModel().eval()
    x = torch.randn(batch, seq, 48)
    with torch.no_grad():
        expected = model(x)
        program = torch.export.export(model, (x,))
        os.makedirs(out_dir, exist_ok=True)
        package = torch._inductor.aoti_compile_and_package(
            program, package_path=os.path.join(out_dir, "model.pt2"))
    write_tensors(os.path.join(out_dir, "inputs.krt"), [x])
    write_tensors(os.path.join(out_dir, "expected.krt"), [expected])
    return package


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python csrc/runner/export_model.py OUT_DIR")
    print(export(sys.argv[1]))
