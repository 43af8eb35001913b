"""When building a Kronecker product or a merged weight pays: the dispatch rules of
``kron_linear``, of the adapter layers and of ``sparse_linear``, one threshold per device
kind (the measurements and predictions behind each threshold: bench/NOTES.md, "Dispatch
thresholds and their history").

``materialise_pays(device_type, in_features, out_features)``: build s·kron(A, B) once per
call and run one GEMM instead of the fused Kronecker kernels. The score is the weight's
arithmetic intensity in·out/(in+out), the FLOPs per activation element of the dense GEMM:
while it stays under about twice the machine's ridge the GEMM costs about what the fused
path's memory traffic does, and the product is small to build.

``merge_weight_pays(device_type, tokens, in_features, out_features, dtype)``: the adapter
step as one GEMM on W + s·A⊗B (``kron_linear_merged``) instead of the base GEMM plus the
adapter's own passes. Building W' twice a step is a fixed cost in in·out while the adapter's
passes cost tokens·(in+out), so it pays from tokens ≥ factor·in·out/(in+out). Only for a
W' in fp32 or fp64 (``MERGED_DTYPES``): rounded to bf16 or fp16, W + Δ loses the part of Δ
under half of W's rounding step (all of an update of 1e-4 on a bf16 weight of 0.02), which
the separate products keep. Never while torch.compile traces, even pinned: its partitioner
would merge the forward's and the backward's W' builds and keep W' from forward to backward.
``sparse_merge_pays(device_type, tokens, in_features, out_features, dtype, fraction)``: the
same choice for S²FT's ``sparse_linear`` (one GEMM on W with Δ added into its rows or
columns, ``kronops/s2ft/merged.py``, against the GEMM plus the Δ products, whose cost is
the selected ``fraction`` of a GEMM's): tokens·fraction ≥ factor·in·out/(in+out), with its
own factor; CUDA not measured: never merged there.

``factor_split(device_type, shapes)``: ``kron_matmul`` with N >= 3 factors as one fused
two-factor product of kron(f1..fk) and kron(fk+1..fN), both built per call, instead of the
leading factors one mode at a time (a pass over the activations each). The split has the
fewest fused FLOPs among those whose two products stay small (≤ 64K elements). On for CPU
on the PyTorch kernels; off with the native library (its mode products are faster) and on
CUDA (the fused kernel's tiles were tuned for factors up to 64×64).

``one_pass_backward(fits)``: on CUDA, the Kronecker backward in one pass over x and dY
(``kronops/kernels/kron/rows_grads.py``) where the factors fit it (``fits``, from the
kernel), else the three kernels.

``persistent_forward(fits)``: on CUDA, the forward as a persistent kernel with A and B
loaded once per program (``kronops/kernels/kron/rows_persistent.py``) where the factors fit
it. Opt-in (``override(persistent=True)``) until a GPU measures it against ``rows.py``.

``override(materialise=..., merge=..., group=..., one_pass=..., persistent=...)``: a context
in which the rules give fixed answers (tests and benchmarks pin a path; process-wide, not
per thread).
"""
import contextlib
import math

import torch

from .. import native

MATERIALISE_MAX_INTENSITY = {"cuda": 384.0, "cpu": 32.0}
MATERIALISE_MAX_ELEMENTS = {"cuda": 1 << 22, "cpu": 1 << 22}
MERGE_TOKEN_FACTOR = {"cuda": 0.6, "cpu": 1.0}
SPARSE_MERGE_TOKEN_FACTOR = {"cpu": 0.0125}  # 0.25·in·out/(in+out) tokens at 5% selected
MERGED_DTYPES = (torch.float32, torch.float64)
GROUP_MAX_ELEMENTS = {"cpu": 1 << 16}  # CPU on the PyTorch kernels (not with the native library)


_pinned = {"materialise": None, "merge": None, "group": None, "one_pass": None,
           "persistent": None}


@contextlib.contextmanager
def override(*, materialise: bool | None = None, merge: bool | None = None,
             group: bool | None = None, one_pass: bool | None = None,
             persistent: bool | None = None):
    """Inside, the rules give the answers given here: ``materialise_pays``,
    ``merge_weight_pays`` and ``sparse_merge_pays`` (except while torch.compile traces),
    ``factor_split`` (True: group at the cheapest split, whatever the products' size),
    ``one_pass_backward`` and ``persistent_forward``. None leaves a rule as it is outside
    (nested overrides add to each other)."""
    saved = dict(_pinned)
    given = dict(materialise=materialise, merge=merge, group=group, one_pass=one_pass,
                 persistent=persistent)
    _pinned.update({k: v for k, v in given.items() if v is not None})
    try:
        yield
    finally:
        _pinned.update(saved)


def intensity(in_features: int, out_features: int) -> float:
    """in·out/(in+out): the dense GEMM's FLOPs per activation element read or written."""
    return in_features * out_features / (in_features + out_features)


def materialise_pays(device_type: str, in_features: int, out_features: int) -> bool:
    """Whether s·kron(A, B) (out, in) built per call and one GEMM beats the fused kernels."""
    if _pinned["materialise"] is not None:
        return _pinned["materialise"]
    limit = MATERIALISE_MAX_INTENSITY.get(device_type)
    return (limit is not None and intensity(in_features, out_features) <= limit
            and in_features * out_features <= MATERIALISE_MAX_ELEMENTS[device_type])


def _merge_pays(factors: dict, device_type: str, work: float, in_features: int,
                out_features: int, dtype: torch.dtype) -> bool:
    """The merge rules' one test: never while torch.compile traces (not even pinned), else
    the pin, else a W' in fp32/fp64 and ``work`` ≥ factor·in·out/(in+out)."""
    if torch.compiler.is_compiling():
        return False
    if _pinned["merge"] is not None:
        return _pinned["merge"]
    factor = factors.get(device_type, math.inf)
    return dtype in MERGED_DTYPES and work >= factor * intensity(in_features, out_features)


def merge_weight_pays(device_type: str, tokens: int, in_features: int, out_features: int,
                      dtype: torch.dtype) -> bool:
    """Whether the adapter step is cheaper as one GEMM on the merged weight, for ``tokens``
    rows of activations (the product of x's leading dimensions) and a W' in ``dtype`` (never
    for bf16 or fp16, unless pinned)."""
    return _merge_pays(MERGE_TOKEN_FACTOR, device_type, tokens, in_features, out_features,
                       dtype)


def sparse_merge_pays(device_type: str, tokens: int, in_features: int, out_features: int,
                      dtype: torch.dtype, fraction: float) -> bool:
    """``merge_weight_pays`` for S²FT's ``sparse_linear`` with ``fraction`` of W's rows (or
    columns) selected (``SPARSE_MERGE_TOKEN_FACTOR``)."""
    return _merge_pays(SPARSE_MERGE_TOKEN_FACTOR, device_type, tokens * fraction, in_features,
                       out_features, dtype)


def fused_flops(a_shape, b_shape) -> int:
    """Multiply-adds per row of the fused y_m = A X_m Bᵀ, cheaper side first."""
    (a1, a2), (b1, b2) = a_shape, b_shape
    return min(b1 * a2 * (b2 + a1), a1 * b2 * (a2 + b1))


def factor_split(device_type: str, shapes) -> int | None:
    """For factor shapes [(p1, q1), ..., (pN, qN)], N >= 3: the k (1 <= k < N) at which
    ``kron_matmul`` groups them into kron(f1..fk) and kron(fk+1..fN), or None (mode by mode)."""
    if len(shapes) < 3 or _pinned["group"] is False:
        return None
    if _pinned["group"]:
        limit = math.inf
    elif device_type == "cpu" and native.active():
        return None
    else:
        limit = GROUP_MAX_ELEMENTS.get(device_type, 0)
    best = None
    for k in range(1, len(shapes)):
        a = (math.prod(p for p, _ in shapes[:k]), math.prod(q for _, q in shapes[:k]))
        b = (math.prod(p for p, _ in shapes[k:]), math.prod(q for _, q in shapes[k:]))
        if max(a[0] * a[1], b[0] * b[1]) <= limit:
            cost = fused_flops(a, b)
            if best is None or cost < best[0]:
                best = (cost, k)
    return None if best is None else best[1]


def one_pass_backward(fits: bool) -> bool:
    """Whether the CUDA backward runs in one pass, for factors that do (``fits``) or do not
    fit the one-pass kernel."""
    return fits and _pinned["one_pass"] is not False


def persistent_forward(fits: bool) -> bool:
    """Whether the CUDA forward runs the persistent kernel, for factors that do (``fits``) or
    do not fit it: only when pinned on, until measured."""
    return fits and _pinned["persistent"] is True
