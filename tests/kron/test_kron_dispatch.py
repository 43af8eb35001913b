"""The size-based paths of the Kronecker ops (``kronops.kron.dispatch``): small products
materialised into one GEMM, and the adapter step as one GEMM on the merged weight
(``kron_linear_merged``) or with the base's GEMMs summed into the adapter's outputs
(``kron_linear_summed``). The rules at their boundaries, each path against the references
(fp64 gradients twice, fp32 on both backends, odd shapes, 3-D and strided inputs), and the
conditions under which KronALinear takes either.""" 
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_PARAMS, ON_GPU, assert_close
from torch import nn

import kronops
from kronops.adapters.lokr import LoKrLinear
from kronops.kron import dispatch, ops
from kronops.kron.merged import kron_linear_merged, merged_weight
from kronops.kron.summed import kron_linear_summed
from kronops.testing import naive_kron_linear

pytestmark = pytest.mark.dispatch_rules


def test_materialise_rule_boundaries():
    # intensity in*out/(in+out): 768x768 scores exactly 384, 770x768 just above
    assert dispatch.intensity(768, 768) == 384
    assert dispatch.materialise_pays("cuda", 768, 768)
    assert not dispatch.materialise_pays("cuda", 770, 768)
    assert dispatch.materialise_pays("cuda", 384, 1536)        # MiniLM: 307
    assert not dispatch.materialise_pays("cuda", 1024, 1024)   # 512: stays fused
    # a product over 4M elements is never built, whatever its intensity
    assert dispatch.intensity(1, 1 << 22) < 384
    assert dispatch.materialise_pays("cuda", 1, 1 << 22)
    assert not dispatch.materialise_pays("cuda", 1, (1 << 22) + 1)
    assert dispatch.materialise_pays("cpu", 64, 64)             # 32
    assert not dispatch.materialise_pays("cpu", 66, 64)
    assert not dispatch.materialise_pays("meta", 4, 4)          # no rule: fused


F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


def test_merge_rule_boundaries():
    # 4096²: intensity 2048, merged from ceil(0.6 * 2048) = 1229 tokens on CUDA
    threshold = math.ceil(dispatch.MERGE_TOKEN_FACTOR["cuda"] * dispatch.intensity(4096, 4096))
    assert dispatch.merge_weight_pays("cuda", threshold, 4096, 4096, F32)
    assert not dispatch.merge_weight_pays("cuda", threshold - 1, 4096, 4096, F32)
    assert dispatch.merge_weight_pays("cpu", 2048, 4096, 4096, F64)
    assert not dispatch.merge_weight_pays("cpu", 2047, 4096, 4096, F32)
    assert not dispatch.merge_weight_pays("meta", 1 << 40, 4096, 4096, F32)
    # a bf16 or fp16 W' would round away updates under half of W's rounding step
    for dtype in (BF16, torch.float16):
        assert not dispatch.merge_weight_pays("cpu", 1 << 20, 4096, 4096, dtype)
        assert not dispatch.merge_weight_pays("cuda", 1 << 20, 4096, 4096, dtype)


def test_override_pins_and_restores():
    with dispatch.override(materialise=True, merge=False):
        assert dispatch.materialise_pays("cpu", 4096, 4096)
        assert not dispatch.merge_weight_pays("cuda", 1 << 20, 64, 64, F32)
        with dispatch.override(merge=True):                    # nested: adds to the outer
            assert dispatch.merge_weight_pays("cpu", 1, 4096, 4096, BF16)
            assert dispatch.materialise_pays("cpu", 4096, 4096)
        assert not dispatch.merge_weight_pays("cpu", 1 << 20, 64, 64, F32)
        assert dispatch.materialise_pays("cpu", 4096, 4096)
    assert not dispatch.materialise_pays("cpu", 4096, 4096)


def _refuse(*args, **kwargs):
    raise AssertionError("the fused kernels ran where the materialised path was expected")


@pytest.mark.parametrize("lead", [(), (7,), (3, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_small_product_is_materialised_and_exact(lead, with_bias, monkeypatch):
    """On CPU a product of intensity <= 32 runs as one GEMM (the fused op is never called),
    with gradients (twice) equal to the reference's."""
    monkeypatch.setattr(ops, "kron_rows", _refuse)
    monkeypatch.setattr(ops, "kron_rows_keep", _refuse)
    kw = dict(dtype=torch.float64, requires_grad=True)
    a, b = torch.randn(3, 2, **kw), torch.randn(5, 4, **kw)       # 8 -> 15 features
    x = torch.randn(*lead, 11, **kw)[..., 1:9]                     # strided rows
    bias = torch.randn(15, **kw) if with_bias else None
    leaves = [t for t in (x, a, b, bias) if t is not None]

    def f(*t):
        return kronops.kron_linear(t[0], t[1], t[2], t[3] if with_bias else None, scale=0.6)

    assert_close(f(*leaves), naive_kron_linear(x, a, b, bias, scale=0.6), torch.float64)
    assert torch.autograd.gradcheck(f, leaves)
    assert torch.autograd.gradgradcheck(f, leaves)


def test_larger_products_stay_fused(monkeypatch):
    calls = []
    fused = ops.kron_rows

    def counted(*args):
        calls.append(1)
        return fused(*args)

    monkeypatch.setattr(ops, "kron_rows", counted)
    x, a, b = torch.randn(4, 72), torch.randn(9, 8), torch.randn(8, 9)  # 72 -> 72: 36 > 32
    kronops.kron_linear(x, a, b)
    assert calls == [1]


def test_materialised_path_under_autocast():
    x, a, b = torch.randn(6, 8), torch.randn(2, 2), torch.randn(4, 4)
    with dispatch.override(materialise=True), torch.autocast("cpu", dtype=torch.bfloat16):
        y = kronops.kron_linear(x, a, b, scale=0.5)
    assert y.dtype == torch.bfloat16
    assert_close(y, naive_kron_linear(x.double(), a.double(), b.double(), scale=0.5),
                 torch.bfloat16)


# ---- the base and its adapter in one node: merged weight, or outputs summed ---------------

ONE_NODE_ROUTES = pytest.mark.parametrize("route", [kron_linear_merged, kron_linear_summed],
                                          ids=["merged", "summed"])

def _merged_inputs(lead, dtype, transposed=False):
    a1, a2, b1, b2 = 3, 4, 5, 2                                     # 8 -> 15 features
    kw = dict(dtype=dtype, requires_grad=True)
    w = (torch.randn(8, 15, **kw) if transposed else torch.randn(15, 8, **kw))
    x = torch.randn(*lead, 10, dtype=dtype)[..., 1:9].requires_grad_()
    return x, w, torch.randn(a1, a2, **kw), torch.randn(b1, b2, **kw), torch.randn(15, **kw)


def test_merged_weight_is_w_plus_scaled_kron():
    w, a, b = torch.randn(15, 8, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), \
        torch.randn(5, 2, dtype=torch.float64)
    assert torch.allclose(merged_weight(w, a, b, 0.3), w + 0.3 * torch.kron(a, b), rtol=0,
                          atol=1e-15)
    wt = torch.randn(8, 15, dtype=torch.float64)                   # a Conv1D weight, viewed
    assert torch.allclose(merged_weight(wt.T, a, b, 0.3), wt.T + 0.3 * torch.kron(a, b),
                          rtol=0, atol=1e-15)


@ONE_NODE_ROUTES
@pytest.mark.parametrize("lead", [(6,), (2, 3)])
@pytest.mark.parametrize("transposed", [False, True])
def test_one_node_linear_gradients_twice(route, lead, transposed):
    x, w, a, b, bias = _merged_inputs(lead, torch.float64, transposed)

    def f(x, w, a, b, bias):
        return route(x, w.T if transposed else w, a, b, bias, scale=0.7)

    assert torch.autograd.gradcheck(f, (x, w, a, b, bias))
    assert torch.autograd.gradgradcheck(f, (x, w, a, b, bias))


@ONE_NODE_ROUTES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_node_linear_matches_separate_on_each_backend(route, dtype, backend_device,
                                                          request):
    """Forward and every gradient against the fp64 reference, on the PyTorch kernels and on
    the Triton kernels (factor gradients through ``kron_rows_grads``)."""
    if (dtype == torch.bfloat16 and not ON_GPU
            and request.node.callspec.params["backend_device"] in KERNEL_PARAMS):
        pytest.skip("bf16 tl.dot is wrong in the Triton interpreter")
    a1, a2, b1, b2 = 6, 5, 7, 3
    x = torch.randn(9, a2 * b2 + 2, device=backend_device)[:, 1:-1].to(dtype).requires_grad_()
    w = torch.randn(a1 * b1, a2 * b2, device=backend_device, dtype=dtype)
    a = torch.randn(a1, a2, device=backend_device, dtype=dtype, requires_grad=True)
    b = torch.randn(b1, b2, device=backend_device, dtype=dtype, requires_grad=True)
    y = route(x, w, a, b, scale=0.5)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, a, b)]
    ref = F.linear(ref_leaves[0], w.double()) + naive_kron_linear(*ref_leaves, scale=0.5)
    assert_close(y, ref, dtype, "forward")
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, a, b), grad.to(dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g, r in zip("xab", got, want):
        assert_close(g, r, dtype, f"grad {name}")


@ONE_NODE_ROUTES
def test_one_node_linear_output_may_be_modified_in_place(route):
    """A caller may add into the output, 3-D or not (transformers' Falcon does)."""
    x, w, a, b, bias = _merged_inputs((2, 3), torch.float64)
    y = route(x, w, a, b, bias, scale=0.7)
    y.mul_(2.0)
    ref = 2.0 * (F.linear(x, w, bias) + naive_kron_linear(x, a, b, scale=0.7))
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(y, (x, w, a, b, bias), grad)
    want = torch.autograd.grad(ref, (x, w, a, b, bias), grad)
    for name, g, r in zip(["x", "w", "a", "b", "bias"], got, want):
        assert_close(g, r, torch.float64, f"grad {name}")


@ONE_NODE_ROUTES
def test_one_node_linear_refuses_bad_weight(route):
    x, a, b = torch.randn(4, 6), torch.randn(2, 3), torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"weight must have shape \(a1\*b1, a2\*b2\) = \(10, 6\)"):
        route(x, torch.randn(6, 10), a, b)
    with pytest.raises(TypeError, match="weight"):
        route(x, [[1.0]], a, b)
    with pytest.raises(ValueError, match="x must have last dim"):
        route(torch.randn(4, 7), torch.randn(10, 6), a, b)


@ONE_NODE_ROUTES
def test_one_node_linear_under_autocast(route):
    x, w, a, b, bias = (t.detach() for t in _merged_inputs((5,), torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = route(x, w, a, b, bias, scale=0.5)
    assert y.dtype == torch.bfloat16
    ref = F.linear(x.double(), w.double(), bias.double()) + \
        naive_kron_linear(x.double(), a.double(), b.double(), scale=0.5)
    assert_close(y, ref, torch.bfloat16)


# ---- KronALinear: when it merges ---------------------------------------------------------

def _layers(kind, dropout=0.0):
    base = nn.Linear(12, 20, dtype=torch.float64)
    if kind == "lokr":
        layer = LoKrLinear(base, rank_b=2, a_shape=(4, 3), dropout=dropout)
    else:
        layer = kronops.KronALinear(base, a_shape=(4, 3), dropout=dropout)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    return layer


def _step(layer, x, forward=None):
    """y and the gradients of x and the layer's trainable parameters, through ``forward``
    (default: the layer)."""
    x = x.clone().requires_grad_()
    y = (forward or layer)(x)
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad(y, [x, *params], torch.ones_like(y))
    return y, grads


@pytest.mark.parametrize("kind", ["krona", "lokr"])
@pytest.mark.parametrize("route, merge", [(kron_linear_merged, True), (kron_linear_summed, False)],
                         ids=["merged", "summed"])
def test_kron_a_linear_one_node_step_equals_two_layers(kind, route, merge, monkeypatch):
    layer = _layers(kind)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    want = _step(layer, x, lambda t: layer.base(t) + layer.adapter(t))
    used = []
    monkeypatch.setattr(f"kronops.kron.modules.{route.__name__}",
                        lambda *a, **k: used.append(1) or route(*a, **k))
    with dispatch.override(merge=merge, materialise=False):
        got = _step(layer, x)
    assert used == [1]
    for g, w in zip((got[0], *got[1]), (want[0], *want[1])):
        assert_close(g, w, torch.float64)


def _merges_unpinned(layer, x) -> bool:
    return layer._route(x) is kron_linear_merged


def _merges(layer, x) -> bool:
    with dispatch.override(merge=True):
        return _merges_unpinned(layer, x)


def test_kron_a_linear_merges_only_when_exact():
    x = torch.randn(3, 12, dtype=torch.float64)
    assert _merges(_layers("krona"), x)
    trained_base = _layers("krona")
    trained_base.base.weight.requires_grad_(True)                  # W needs its gradient
    assert not _merges(trained_base, x)
    with_dropout = _layers("krona", dropout=0.1)
    assert not _merges(with_dropout, x)                             # training: dropout on
    assert _merges(with_dropout.eval(), x)                          # eval: dropout is off
    hooked = _layers("krona")
    hooked.base.register_forward_hook(lambda m, i, o: None)        # the hook must run
    assert not _merges(hooked, x)
    few = torch.randn(7, 12, dtype=torch.float64)                   # 12 -> 20: intensity 7.5
    assert not _merges_unpinned(_layers("krona"), few)             # the CPU rule: from 8 rows
    assert _merges_unpinned(_layers("krona"), torch.randn(2, 4, 12, dtype=torch.float64))
    many = torch.randn(64, 12)
    assert _merges_unpinned(_layers("krona").float(), many)
    with torch.autocast("cpu", dtype=torch.bfloat16):               # a bf16 W': never
        assert not _merges_unpinned(_layers("krona").float(), many)
    assert not _merges_unpinned(_layers("krona").bfloat16(), many.bfloat16())


def test_kron_a_linear_sums_into_its_base_where_merging_would():
    """The summed route has the merged route's conditions, not its rule; small products that
    the adapter materialises keep the two layers."""
    x = torch.randn(3, 12, dtype=torch.float64)
    trained_base, with_dropout, hooked = _layers("krona"), _layers("krona", 0.1), _layers("krona")
    trained_base.base.weight.requires_grad_(True)
    hooked.base.register_forward_hook(lambda m, i, o: None)
    with dispatch.override(merge=False, materialise=False):
        assert _layers("krona")._route(x) is kron_linear_summed
        assert _layers("krona").bfloat16()._route(x.bfloat16()) is kron_linear_summed
        assert with_dropout.eval()._route(x) is kron_linear_summed
        for layer in (trained_base, with_dropout.train(), hooked):
            assert layer._route(x) is None
    with dispatch.override(merge=False, materialise=True):
        assert _layers("krona")._route(x) is None


def test_kron_a_linear_merged_over_conv1d():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    base = Conv1D(20, 12).double()
    layer = kronops.KronALinear(base, a_shape=(4, 3))
    with torch.no_grad():
        layer.b.normal_()
    x = torch.randn(4, 12, dtype=torch.float64)
    with dispatch.override(merge=False):
        want = _step(layer, x)
    with dispatch.override(merge=True):
        got = _step(layer, x)
    for g, w in zip((got[0], *got[1]), (want[0], *want[1])):
        assert_close(g, w, torch.float64)


# ---- kron_matmul: factors grouped into two --------------------------------------------------

def test_factor_split_rule():
    """On the PyTorch kernels CPU groups small factors; with the native library it never
    does (its mode products are faster); CUDA does not until measured."""
    with kronops.native.disabled():
        check_cpu_factor_split_on_the_pytorch_kernels()
    if kronops.native.available():
        assert dispatch.factor_split("cpu", [(16, 16)] * 3) is None
        with dispatch.override(group=True):
            assert dispatch.factor_split("cpu", [(16, 16)] * 3) == 1
    assert dispatch.factor_split("cuda", [(16, 16)] * 3) is None         # not measured: modes
    assert dispatch.fused_flops((16, 16), (256, 256)) == 16 * 256 * (16 + 256)


def check_cpu_factor_split_on_the_pytorch_kernels():
    assert dispatch.factor_split("cpu", [(16, 16)] * 2) is None          # two factors: fused
    assert dispatch.factor_split("cpu", [(16, 16)] * 3) == 1             # 16x16 (x) 256x256
    assert dispatch.factor_split("cpu", [(8, 8)] * 4) == 2               # 64x64 (x) 64x64
    assert dispatch.factor_split("cpu", [(64, 64)] * 3) is None          # 4096² > 64K: modes
    assert dispatch.factor_split("cpu", [(2, 2), (16, 16), (16, 16)]) == 2   # 32x32 (x) 16x16
    # the cap: a 256x256 group (65536 elements) is built, a 256x257 one is not
    assert dispatch.factor_split("cpu", [(256, 256), (1, 1), (1, 1)]) is not None
    assert dispatch.factor_split("cpu", [(256, 257), (1, 1), (1, 1)]) is None


@pytest.mark.parametrize("shapes", [[(3, 2), (2, 4), (4, 3)], [(2, 3), (1, 2), (3, 3), (2, 1)]])
def test_grouped_kron_matmul_gradients_twice(shapes, monkeypatch):
    grouped = []
    linear = ops.kron_linear
    monkeypatch.setattr(ops, "kron_linear", lambda *a, **k: grouped.append(1) or linear(*a, **k))
    kw = dict(dtype=torch.float64, requires_grad=True)
    factors = [torch.randn(p, q, **kw) for p, q in shapes]
    x = torch.randn(2, 3, math.prod(q for _, q in shapes) + 1, **kw)[..., 1:]

    def f(x, *fs):
        with dispatch.override(group=True):
            return kronops.kron_matmul(x, fs, scale=0.4)

    from kronops.testing import naive_kron_matmul
    assert_close(f(x, *factors), naive_kron_matmul(x, factors, scale=0.4), torch.float64)
    assert grouped == [1]
    assert torch.autograd.gradcheck(f, (x, *factors))
    assert torch.autograd.gradgradcheck(f, (x, *factors))


def test_compiled_step_keeps_the_separate_adapter():
    """Compiled, KronALinear runs the separate adapter even pinned to merge (the partitioner
    would keep W' from forward to backward: a weight copy through the step), in one graph:
    the base summed into the adapter's outputs (``kron_linear_summed``), no W' built."""
    torch._dynamo.reset()
    layer = _layers("krona")
    x = torch.randn(16, 12, dtype=torch.float64)
    graphs = []

    def backend(gm, example_inputs):
        bodies = [str(m.graph) for name, m in gm.named_children() if name.startswith("fwd_body")]
        graphs.append("\n".join([str(gm.graph), *bodies]))
        return gm.forward

    with dispatch.override(merge=False):
        want = _step(layer, x)
    with dispatch.override(merge=True, materialise=False):
        got = _step(torch.compile(layer, fullgraph=True, backend=backend), x)
    # the merged route builds W' = W + s·A⊗B by addcmul (merged_weight); the summed one adds
    # the base's GEMM into the adapter's output (addmm_)
    assert len(graphs) == 1 and "addcmul" not in graphs[0] and "addmm_" in graphs[0]
    for g, w in zip((got[0], *got[1]), (want[0], *want[1])):
        assert_close(g, w, torch.float64)
