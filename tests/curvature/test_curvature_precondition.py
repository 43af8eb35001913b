"""KFACPreconditioner: the preconditioned gradient against the materialised
((A + γI) ⊗ (G + γI))⁻¹ vec(∇W) (torch.kron, torch.linalg.solve, vec stacking columns) in
fp64, with and without a bias, for S²FT layers; one SGD step; refreshes only every
update_every steps.

fp64 tolerance 1e-10 relative: the factors' condition numbers (damped, ≤ ~1e3 here) times
~1e-15 per product, with room.
"""
import copy

import pytest
import torch
from curvature_models import Classifier, batch
from models import build, family_batch

from kronops.curvature import KFACPreconditioner, collect
from kronops.s2ft import InPlaceAdamW, S2FTInPlaceLinear, S2FTLinear
from kronops.testing import relative_error

FP64 = 1e-10
BATCHES = [batch(1, pad=1), batch(2, t=4)]
DAMPING = 1e-2


def close(actual, expected):
    assert relative_error(actual, expected) <= FP64, relative_error(actual, expected)


def materialised(grad, f, damping):
    """((A + γI) ⊗ (G + γI))⁻¹ vec(grad), reshaped back to (out', in')."""
    a = f.a + damping * torch.eye(f.a.shape[0], dtype=f.a.dtype)
    g = f.g + damping * torch.eye(f.g.shape[0], dtype=f.g.dtype)
    v = torch.linalg.solve(torch.kron(a, g), grad.T.reshape(-1))
    return v.reshape(grad.shape[1], grad.shape[0]).T


def gradients(model):
    model.zero_grad()
    model(**BATCHES[0]).loss.backward()


@pytest.mark.parametrize("bias", [True, False])
def test_preconditioned_gradient_equals_the_materialised_solve(bias):
    torch.manual_seed(0)
    model = Classifier(hidden=6, bias=bias)
    factors = collect(model, BATCHES, dtype=torch.float64)
    gradients(model)
    raw = {}
    for name in factors:
        layer = getattr(model, name)
        raw[name] = layer.weight.grad.clone()
        if bias:
            raw[name] = torch.cat([raw[name], layer.bias.grad[:, None]], 1)
    KFACPreconditioner(model, factors, damping=DAMPING).step()
    for name, f in factors.items():
        layer = getattr(model, name)
        got = layer.weight.grad
        if bias:
            got = torch.cat([got, layer.bias.grad[:, None]], 1)
        close(got, materialised(raw[name], f, DAMPING))


@pytest.mark.parametrize("layer", [S2FTLinear, S2FTInPlaceLinear])
@pytest.mark.parametrize("side", ["rows", "cols"])
def test_s2ft_gradient_is_preconditioned_with_the_restricted_factors(layer, side):
    torch.manual_seed(0)
    model = Classifier(hidden=6)
    index = torch.tensor([0, 2, 3]) if side == "rows" else range(1, 4)
    fp64 = dict(delta_dtype=torch.float64) if layer is S2FTLinear else {}
    model.body = layer(model.body, **{side: index}, **fp64)
    factors = collect(model, BATCHES, dtype=torch.float64)
    gradients(model)
    trained = model.body.delta if layer is S2FTLinear else model.body.selected
    raw = trained.grad.clone()
    KFACPreconditioner(model, factors, damping=DAMPING).step()
    assert trained.grad.shape == factors["body"].shape
    close(trained.grad, materialised(raw, factors["body"], DAMPING))


def test_in_place_adamw_steps_with_the_preconditioned_gradient():
    torch.manual_seed(0)
    model = Classifier(hidden=6)
    model.body = S2FTInPlaceLinear(model.body, rows=torch.tensor([1, 4]))
    pre = KFACPreconditioner(model, collect(model, BATCHES, dtype=torch.float64),
                             damping=DAMPING)
    optimizer = InPlaceAdamW(model, lr=1e-2)
    before = model.body.base.weight.detach().clone()
    gradients(model)
    pre.step()
    optimizer.step()
    changed = (model.body.base.weight != before).any(1)
    assert changed.tolist() == [False, True, False, False, True, False]


def test_one_sgd_step_moves_by_the_preconditioned_gradient():
    torch.manual_seed(0)
    model = Classifier(hidden=6)
    factors = collect(model, BATCHES, dtype=torch.float64)
    reference = copy.deepcopy(model)
    gradients(reference)
    KFACPreconditioner(reference, factors, damping=DAMPING).step()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    pre = KFACPreconditioner(model, factors, damping=DAMPING)
    gradients(model)
    pre.step()
    optimizer.step()
    for p, r in zip(model.parameters(), reference.parameters()):
        close(p, r.detach() - 0.5 * r.grad)


def test_refreshes_only_every_update_every_steps(monkeypatch):
    torch.manual_seed(0)
    model = Classifier(hidden=6)
    calls = {"collect": 0, "eigh": 0}
    eigh = torch.linalg.eigh

    def counting_eigh(m):
        calls["eigh"] += 1
        return eigh(m)

    def collect_fn():
        calls["collect"] += 1
        return collect(model, BATCHES, dtype=torch.float64)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    pre = KFACPreconditioner(model, damping=DAMPING, update_every=3, collect_fn=collect_fn)
    for _ in range(7):  # refreshes before steps 0, 3 and 6
        gradients(model)
        pre.step()
    assert calls == {"collect": 3, "eigh": 3 * 2 * 2} and pre.refreshes == 3
    given = KFACPreconditioner(model, collect_fn(), damping=DAMPING, update_every=3,
                               collect_fn=collect_fn)
    for _ in range(3):  # the given factors serve steps 0-2
        given.step()
    assert given.refreshes == 1 and calls["collect"] == 4


def test_bad_arguments_are_named():
    torch.manual_seed(0)
    model = Classifier(hidden=6)
    factors = collect(model, BATCHES, dtype=torch.float64)
    for damping, error in [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                           ("1", TypeError)]:
        with pytest.raises(error, match="damping"):
            KFACPreconditioner(model, factors, damping=damping)
    with pytest.raises(ValueError, match="update_every"):
        KFACPreconditioner(model, factors, damping=1.0, update_every=0)
    with pytest.raises(TypeError, match="collect_fn"):
        KFACPreconditioner(model, factors, damping=1.0, collect_fn=1)
    with pytest.raises(ValueError, match="collect_fn"):
        KFACPreconditioner(model, damping=1.0)
    with pytest.raises(ValueError, match="no module 'tail'"):
        KFACPreconditioner(model, {"tail": factors["head"]}, damping=1.0)
    with pytest.raises(ValueError, match=r"factors\['head'\] are for a gradient of shape"):
        KFACPreconditioner(model, {"head": factors["body"]}, damping=1.0)
    with pytest.raises(TypeError, match=r"factors\['head'\] must be a LayerFactors"):
        KFACPreconditioner(model, {"head": 1}, damping=1.0)
    plain = Classifier(hidden=6, bias=False)
    with pytest.raises(ValueError, match=r"factors\['head'\] have a bias part"):
        KFACPreconditioner(plain, {"head": factors["head"]}, damping=1.0)
    s2ft = copy.deepcopy(model)
    s2ft.body = S2FTLinear(s2ft.body, rows=range(2))
    with pytest.raises(ValueError, match="selection"):
        KFACPreconditioner(s2ft, {"body": factors["body"]}, damping=1.0)


def test_conv1d_gradient_is_preconditioned_through_its_out_in_view():
    """GPT-2's Conv1D (weight and gradient stored (in, out))."""
    model = build("gpt2")
    name = "transformer.h.0.attn.c_proj"
    b = family_batch("gpt2")
    b = dict(b, labels=b["input_ids"])
    factors = collect(model, [b], dtype=torch.float64, modules=lambda n, m: n == name)
    model.to(torch.float64)
    model(**b).loss.backward()
    layer = model.get_submodule(name)
    raw = torch.cat([layer.weight.grad.T, layer.bias.grad[:, None]], 1)
    KFACPreconditioner(model, factors, damping=DAMPING).step()
    got = torch.cat([layer.weight.grad.T, layer.bias.grad[:, None]], 1)
    close(got, materialised(raw, factors[name], DAMPING))
