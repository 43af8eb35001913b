"""The Kronecker ops and layers on any input they accept are right, and refuse the rest by
name before anything changes, the same way on every backend: the PyTorch kernels, the
native CPU kernels and the Triton kernels (the interpreter's on CPU).

Every path (materialised, grouped, mode by mode then fused, merged weight, autocast, the
layers' merge and delta weight) on transposed, sliced and broadcast factors and inputs
against the fp64 reference; the double backward at a scale other than 1 against the
reference's (gradgradcheck alone cannot see a first derivative that is wrong under
create_graph); non-finite scale and alpha, zero-size factors and ranks out of range refused.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ON_GPU, assert_close
from torch import nn

import kronops
from kronops import backends, native
from kronops.kron import dispatch
from kronops.kron.merged import kron_linear_merged
from kronops.testing import naive_kron, naive_kron_linear, naive_kron_matmul

SCALE = 0.6


@pytest.fixture(params=["composite", "native", "triton"])
def backend(request):
    """Each backend in turn, as the device its tensors go on: the PyTorch kernels (CPU), the
    native kernels (CPU; skipped where the library is not built) and the Triton kernels
    (CUDA, or CPU through the interpreter)."""
    if request.param == "composite":
        with native.disabled():
            yield "cpu"
    elif request.param == "native":
        if not native.available():
            pytest.skip(f"native library {native.load_error()}")
        yield "cpu"
    elif ON_GPU:
        yield "cuda"
    else:
        with backends.triton_on_cpu():
            yield "cpu"


def laid_out(shape, layout, device="cpu", dtype=torch.float32):
    """A random leaf tensor of ``shape`` stored ``layout``: "contiguous", "transposed" (the last
    two dimensions swapped in memory), "sliced" (every other element of the last dimension
    of a wider tensor) or "broadcast" (one row repeated: stride 0 on the second-to-last)."""
    kw = dict(device=device, dtype=dtype)
    if layout == "transposed":
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], **kw).mT
    elif layout == "sliced":
        t = torch.randn(*shape[:-1], 2 * shape[-1], **kw)[..., ::2]
    elif layout == "broadcast":
        t = torch.randn(*shape[:-2], 1, shape[-1], **kw).expand(shape)
    else:
        t = torch.randn(shape, **kw)
    assert t.shape == shape and t.is_contiguous() == (layout == "contiguous")
    return t.detach().requires_grad_()


def check_against_fp64(fn, ref_fn, leaves, dtype=torch.float32):
    """``fn(*leaves)`` and its gradients in every leaf against ``ref_fn`` on fp64 copies."""
    y = fn(*leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = ref_fn(*ref_leaves)
    assert y.shape == ref.shape and y.dtype == dtype
    assert_close(y, ref, dtype, "forward")
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y, leaves, grad.to(y.dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_close(g, w, dtype, f"gradient of input {i}")


# (a layout, b layout): torch.kron in torch 2.13 refuses the first, second and fourth mix
FACTOR_LAYOUTS = [("contiguous", "transposed"), ("transposed", "sliced"),
                  ("sliced", "broadcast"), ("broadcast", "transposed")]


@pytest.mark.parametrize("a_layout,b_layout", FACTOR_LAYOUTS)
@pytest.mark.parametrize("path", ["materialised", "fused"])
def test_kron_linear_takes_any_strides(path, a_layout, b_layout, backend):
    x = laid_out((2, 5, 12), "transposed", backend)
    a, b = laid_out((3, 4), a_layout, backend), laid_out((2, 3), b_layout, backend)
    bias = laid_out((6,), "sliced", backend)
    with dispatch.override(materialise=path == "materialised"):
        check_against_fp64(lambda *t: kronops.kron_linear(*t, scale=SCALE),
                           lambda *t: naive_kron_linear(*t, scale=SCALE), [x, a, b, bias])


MATMUL_PATHS = {"grouped": dict(group=True), "modes, then fused": dict(materialise=False),
                "modes, then materialised": dict(materialise=True)}


@pytest.mark.parametrize("layouts", [("transposed", "contiguous", "sliced"),
                                     ("contiguous", "broadcast", "transposed")])
@pytest.mark.parametrize("path", MATMUL_PATHS)
def test_kron_matmul_takes_any_strides(path, layouts, backend):
    shapes = [(2, 3), (3, 2), (2, 2)]
    x = laid_out((5, 12), "sliced", backend)
    factors = [laid_out(s, layout, backend) for s, layout in zip(shapes, layouts)]
    with dispatch.override(**MATMUL_PATHS[path]):
        check_against_fp64(lambda x, *f: kronops.kron_matmul(x, f, scale=SCALE),
                           lambda x, *f: naive_kron_matmul(x, f, scale=SCALE), [x, *factors])


@pytest.mark.parametrize("weight_layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("a_layout,b_layout", FACTOR_LAYOUTS[:2])
def test_merged_weight_takes_any_strides(weight_layout, a_layout, b_layout, backend):
    x, w = laid_out((7, 12), "transposed", backend), laid_out((6, 12), weight_layout, backend)
    a, b = laid_out((3, 4), a_layout, backend), laid_out((2, 3), b_layout, backend)

    def reference(x, w, a, b):
        return F.linear(x, w) + naive_kron_linear(x, a, b, scale=SCALE)

    check_against_fp64(lambda *t: kron_linear_merged(*t, scale=SCALE), reference, [x, w, a, b])


@pytest.mark.parametrize("path", ["materialised", "fused"])
def test_autocast_takes_any_strides(path, backend):
    """fp16 autocast (bf16 is wrong in the Triton interpreter): the operands are cast, keeping
    their strides, before the product is built or the kernels run."""
    x = laid_out((5, 12), "transposed", backend)
    a, b = laid_out((3, 4), "contiguous", backend), laid_out((2, 3), "transposed", backend)
    # the reference: the autocast product of fp16-rounded operands, in fp64
    leaves = [t.detach().half().float().requires_grad_() for t in (x, a, b)]

    def autocast_linear(*t):
        with torch.autocast(backend, dtype=torch.float16):
            return kronops.kron_linear(*t, scale=SCALE)

    with dispatch.override(materialise=path == "materialised"):
        check_against_fp64(autocast_linear, lambda *t: naive_kron_linear(*t, scale=SCALE),
                           leaves, torch.float16)


def test_layers_take_factors_of_any_strides(backend):
    """KronALinear with factor parameters stored transposed and sliced: delta weight, forward
    (adapter path and merged-weight path), merge and unmerge; KronLinear's weight."""
    base = nn.Linear(12, 6, device=backend)
    layer = kronops.KronALinear(base, a_shape=(3, 4), alpha=1.5)
    layer.a = nn.Parameter(laid_out((3, 4), "transposed", backend))
    layer.b = nn.Parameter(laid_out((2, 3), "sliced", backend))
    a, b, w = (t.detach().double() for t in (layer.a, layer.b, base.weight))
    delta = 1.5 * naive_kron(a, b)
    assert_close(layer.delta_weight(), delta, torch.float32, "delta weight")
    x = torch.randn(4, 12, device=backend)
    want = F.linear(x.double(), w + delta, base.bias.double())
    for merge in (False, True):
        with dispatch.override(merge=merge):
            assert_close(layer(x), want, torch.float32, f"forward, merge={merge}")
    layer.merge()
    assert_close(base.weight, w + delta, torch.float32, "merged weight")
    assert_close(layer(x), want, torch.float32, "forward, merged")
    layer.unmerge()
    assert_close(base.weight, w, torch.float32, "unmerged weight")
    dense = kronops.KronLinear(12, 6, a_shape=(3, 4), device=backend)
    dense.a = nn.Parameter(laid_out((3, 4), "transposed", backend))
    assert_close(dense.weight(), naive_kron(dense.a.double(), dense.b.double()), torch.float32,
                 "KronLinear weight")


# ---- the double backward at a scale other than 1 ------------------------------------------

@pytest.mark.parametrize("path", ["materialised", "fused", "merged weight"])
def test_double_backward_at_a_scale(path, backend):
    """dX, dA, dB and dbias taken with create_graph, then differentiated again (in x, a, b and
    the output gradient), against the fp64 reference at scale 0.6, in fp32 so that the
    Triton kernels run too; and gradgradcheck in fp64 (which the Triton backend runs on the
    PyTorch kernels)."""
    leaves = [laid_out((3, 12), "contiguous", backend), laid_out((3, 4), "transposed", backend),
              laid_out((2, 3), "contiguous", backend), laid_out((6,), "contiguous", backend)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    weight = torch.randn(6, 12, dtype=torch.float64, device=backend)
    dy = torch.randn(3, 6, dtype=torch.float64, device=backend)
    probes = [torch.randn_like(t) for t in ref_leaves]   # a random direction per gradient

    def op(x, a, b, bias):
        if path == "merged weight":
            return kron_linear_merged(x, weight.to(x.dtype), a, b, bias, scale=SCALE)
        return kronops.kron_linear(x, a, b, bias, scale=SCALE)

    def reference(x, a, b, bias):
        base = F.linear(x, weight) if path == "merged weight" else 0
        return base + naive_kron_linear(x, a, b, bias, scale=SCALE)

    def twice(fn, leaves, dy):
        """The first gradients (create_graph) and the gradients of <first, probes> in x, a,
        b and dy (nothing in the first gradients depends on bias)."""
        dy = dy.detach().requires_grad_()
        first = torch.autograd.grad(fn(*leaves), leaves, dy, create_graph=True)
        total = sum((g * p.to(g.dtype)).sum() for g, p in zip(first, probes))
        return first, torch.autograd.grad(total, [*leaves[:3], dy])

    with dispatch.override(materialise=path == "materialised"):
        first, second = twice(op, leaves, dy.float())
        ref_first, ref_second = twice(reference, ref_leaves, dy)
        for name, g, r in zip(["dx", "da", "db", "dbias"], first, ref_first):
            assert_close(g, r, torch.float32, f"{name} under create_graph")
        for name, g, r in zip(["x", "a", "b", "dy"], second, ref_second):
            assert_close(g, r, torch.float32, f"second derivative in {name}")
        assert torch.autograd.gradgradcheck(op, ref_leaves)


# ---- refused by name, the same on every backend -------------------------------------------

@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("op", ["kron_linear", "kron_matmul", "kron_linear_merged"])
@pytest.mark.parametrize("path", ["materialised", "fused"])
def test_non_finite_scale_is_refused(scale, op, path, backend):
    x, a, b = (torch.randn(s, device=backend) for s in ((5, 12), (3, 4), (2, 3)))
    call = dict(kron_linear=lambda: kronops.kron_linear(x, a, b, scale=scale),
                kron_matmul=lambda: kronops.kron_matmul(x, [a, b], scale=scale),
                kron_linear_merged=lambda: kron_linear_merged(
                    x, torch.randn(6, 12, device=backend), a, b, scale=scale))[op]
    with dispatch.override(materialise=path == "materialised"), \
            pytest.raises(ValueError, match=f"scale must be finite, got {scale}"):
        call()


@pytest.mark.parametrize("empty", [0, 1, 2])
@pytest.mark.parametrize("path", MATMUL_PATHS)
def test_kron_matmul_names_the_zero_size_factor(empty, path, backend):
    shapes = [(2, 3), (3, 2), (2, 2)]
    shapes[empty] = (0, shapes[empty][1])
    factors = [torch.randn(s, device=backend) for s in shapes]
    with dispatch.override(**MATMUL_PATHS[path]), pytest.raises(
            ValueError, match=rf"factors\[{empty}\] must have no zero-size dimension, got "
                              rf"shape \(0, {shapes[empty][1]}\)"):
        kronops.kron_matmul(torch.randn(5, 12, device=backend), factors)


BAD_FACTORS = [
    (dict(alpha=math.nan), ValueError, "alpha must be finite, got nan"),
    (dict(alpha=math.inf, rank=2), ValueError, "alpha must be finite, got inf"),
    (dict(alpha="big"), TypeError, "alpha must be a number, got 'big'"),
    (dict(alpha=True), TypeError, "alpha must be a number, got True"),
    (dict(rank=0), ValueError, "rank must be a positive int or None, got 0"),
    (dict(rank=2.0), ValueError, "rank must be a positive int or None, got 2.0"),
    (dict(a_shape=(0, 4)), ValueError, r"a_shape must be a pair of positive ints"),
    (dict(a_shape=(2, -4)), ValueError, r"a_shape must be a pair of positive ints"),
    (dict(a_shape=(2.0, 4)), ValueError, r"a_shape must be a pair of positive ints"),
    (dict(a_shape=(3, 4)), ValueError, r"a_shape \(3, 4\) must divide"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_FACTORS)
@pytest.mark.parametrize("layer", ["KronALinear", "KronABlock"])
def test_adapter_layers_refuse_bad_factor_arguments(layer, kwargs, error, match):
    """As apply_adapters refuses them, and before the frozen base is touched."""
    base = nn.Linear(8, 4)
    with pytest.raises(error, match=match):
        if layer == "KronALinear":
            kronops.KronALinear(base, **kwargs)
        else:
            kronops.KronABlock(base, 8, 4, **kwargs)
    assert all(p.requires_grad for p in base.parameters())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(in_features=0, out_features=4), ValueError, "in_features must be a positive int, got 0"),
    (dict(in_features=8, out_features=2.5), ValueError,
     "out_features must be a positive int, got 2.5"),
    (dict(in_features=True, out_features=4), ValueError,
     "in_features must be a positive int, got True"),
    (dict(in_features=8, out_features=4, a_shape=(2, 0)), ValueError,
     "a_shape must be a pair of positive ints"),
])
def test_kron_linear_layer_refuses_bad_shapes(kwargs, error, match):
    with pytest.raises(error, match=match):
        kronops.KronLinear(**kwargs)


def test_krona_block_refuses_bad_sizes_and_residual():
    with pytest.raises(ValueError, match="out_features must be a positive int, got -4"):
        kronops.KronABlock(nn.Linear(8, 4), 8, -4)
    with pytest.raises(TypeError, match="residual must be a bool, got 'yes'"):
        kronops.KronABlock(nn.Linear(8, 8), 8, 8, residual="yes")


def test_adapter_layer_takes_a_rank_above_the_smaller_side_of_a():
    """PEFT's LoKr decomposes w1 at ranks above min(a1, a2) (r=3 for a 2x8 A); the layer
    computes such an A = A_u @ A_v exactly, as from_peft needs."""
    torch.manual_seed(0)
    base = nn.Linear(64, 8)
    layer = kronops.KronALinear(base, a_shape=(2, 8), rank=3, alpha=1.5).double()
    with torch.no_grad():
        layer.b.normal_()
    x = torch.randn(5, 64, dtype=torch.float64)
    ref = base(x) + 0.5 * x @ torch.kron(layer.a_u @ layer.a_v, layer.b).T
    assert_close(layer(x), ref, torch.float64, "rank 3 over a 2x8 A")
