"""ewc_penalty(): the Kronecker-factored and diagonal EWC penalties against their materialised
forms (torch.kron) in fp64, their gradients against autograd of those forms, and S²FT layers
(penalty and gradient over the selection only, anchored at the earlier task's weights
across two tasks, one InPlaceAdamW step).

fp64 tolerance 1e-10 relative: a few hundred products summed, ~1e-15 each.
"""
import copy

import pytest
import torch
from curvature_models import Classifier, batch
from models import build, family_batch

from kronops.curvature import LayerFactors, collect, ewc_penalty
from kronops.s2ft import InPlaceAdamW, S2FTInPlaceLinear, S2FTLinear
from kronops.testing import relative_error
from kronops.wrapped_linear import out_in_weight

FP64 = 1e-10
BATCHES = [batch(1, pad=1), batch(2, t=4)]


def close(actual, expected):
    assert relative_error(actual, expected) <= FP64, relative_error(actual, expected)


def trained(bias=True):
    """(model, anchor, factors with the diagonal): factors collected at the anchor, then
    every weight and bias moved."""
    torch.manual_seed(0)
    anchor = Classifier(hidden=6, bias=bias)
    factors = collect(anchor, BATCHES, dtype=torch.float64, diagonal=True)
    model = copy.deepcopy(anchor)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model, anchor, factors


def differences(model, anchor, factors):
    """{name: ΔW (out, in') with the bias column}, differentiable in model's parameters."""
    out = {}
    for name in factors:
        layer, old = getattr(model, name), getattr(anchor, name)
        d = layer.weight - old.weight.detach()
        if layer.bias is not None:
            d = torch.cat([d, (layer.bias - old.bias.detach())[:, None]], 1)
        out[name] = d
    return out


def materialised(deltas, factors, strength, kind):
    total = 0
    for name, d in deltas.items():
        f = factors[name]
        v = d.T.reshape(-1)  # vec: columns stacked
        if kind == "kron":
            total = total + v @ torch.kron(f.a, f.g) @ v
        else:
            total = total + v @ torch.diag(f.diag.T.reshape(-1)) @ v
    return 0.5 * strength * total


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kind", ["kron", "diag"])
def test_penalty_and_gradient_equal_materialised(bias, kind):
    model, anchor, factors = trained(bias)
    penalty = ewc_penalty(model, factors, anchor, strength=3.0, kind=kind)
    expected = materialised(differences(model, anchor, factors), factors, 3.0, kind)
    close(penalty, expected)
    params = list(model.parameters())
    for got, want in zip(torch.autograd.grad(penalty, params),
                         torch.autograd.grad(expected, params)):
        close(got, want)
    same = ewc_penalty(model, factors, anchor.state_dict(), strength=3.0, kind=kind)
    assert torch.equal(same, penalty)
    assert ewc_penalty(anchor, factors, anchor, strength=3.0, kind=kind) == 0


def scattered(plain, name, layer):
    """``plain`` with ``layer``'s trained part added into its weight (zero elsewhere)."""
    full = copy.deepcopy(plain)
    with torch.no_grad():
        getattr(full, name).weight.copy_(layer.base_weight)
        if isinstance(layer, S2FTLinear) and not isinstance(layer, S2FTInPlaceLinear):
            layer.chosen.add_into(getattr(full, name).weight, layer.delta)
    return full


def adapt(model, layer, side):
    """``model.body`` wrapped in ``layer`` (an S²FT class, fp64) on rows 0, 2, 3 or
    columns 1-3; returns the wrapper."""
    index = torch.tensor([0, 2, 3]) if side == "rows" else range(1, 4)
    fp64 = dict(delta_dtype=torch.float64) if layer is S2FTLinear else {}
    model.body = layer(model.body, **{side: index}, **fp64)
    return model.body


def move(s2ft):
    """Add a random step (entries ~0.1) to the selected part of ``s2ft``'s weight."""
    step = torch.randn(s2ft.chosen.part_shape((6, 5)), dtype=torch.float64) * 0.1
    if isinstance(s2ft, S2FTInPlaceLinear):
        s2ft.write_weight_part(s2ft.weight_part() + step)
    else:
        with torch.no_grad():
            s2ft.delta.add_(step)


@pytest.mark.parametrize("layer", [S2FTLinear, S2FTInPlaceLinear])
@pytest.mark.parametrize("side", ["rows", "cols"])
def test_s2ft_penalty_covers_the_selection_only(layer, side):
    """The penalty with the restricted factors equals the full-factor penalty of a plain
    model whose ΔW is the trained part, zero elsewhere; the gradient reaches delta/selected
    and equals the full gradient's selected part."""
    torch.manual_seed(0)
    anchor = Classifier(hidden=6)
    full_factors = collect(anchor, BATCHES, dtype=torch.float64)
    model = copy.deepcopy(anchor)
    s2ft = adapt(model, layer, side)
    factors = collect(model, BATCHES, dtype=torch.float64)
    move(s2ft)
    full = scattered(anchor, "body", s2ft)
    penalty = ewc_penalty(model, factors, anchor, strength=2.0)
    expected = ewc_penalty(full, full_factors, anchor, strength=2.0)
    close(penalty, expected)
    penalty.backward()
    expected.backward()
    trained_part = s2ft.delta if layer is S2FTLinear else s2ft.selected
    close(trained_part.grad, s2ft.chosen.part(full.body.weight.grad))
    assert s2ft.base.weight.grad is None


def two_tasks(layer, side):
    """(model after task 2, the anchor after task 1, factors at the anchor): ``layer`` (an
    S²FT class) on the Classifier's body, its selected part moved in each task."""
    torch.manual_seed(0)
    model = Classifier(hidden=6)
    s2ft = adapt(model, layer, side)
    move(s2ft)
    anchor = copy.deepcopy(model)
    factors = collect(anchor, BATCHES, dtype=torch.float64)
    move(s2ft)
    return model, anchor, factors


@pytest.mark.parametrize("layer, form", [(S2FTLinear, "model"), (S2FTLinear, "state_dict"),
                                         (S2FTLinear, "merged model"),
                                         (S2FTInPlaceLinear, "model"),
                                         (S2FTInPlaceLinear, "state_dict")])
@pytest.mark.parametrize("side", ["rows", "cols"])
def test_s2ft_penalty_is_anchored_at_the_earlier_task(layer, side, form):
    """Continual use: after task 1 (the anchor) and task 2, ΔW is the selected part of the
    task-2 weight minus the task-1 weight (materialised as full weights), not the adapter's
    whole Δ from its base; penalty and gradient against torch.kron."""
    model, anchor, factors = two_tasks(layer, side)
    s2ft, f = model.body, factors["body"]
    d = s2ft.chosen.part(scattered(anchor, "body", s2ft).body.weight -
                         scattered(anchor, "body", anchor.body).body.weight)
    assert d.abs().max() > 0.01  # the anchor's own Δ is not part of it
    v = d.T.reshape(-1)
    kron = torch.kron(f.a, f.g)
    if form == "merged model":
        anchor.body.merge()
    given = anchor.state_dict() if form == "state_dict" else anchor
    penalty = ewc_penalty(model, factors, given, strength=2.0)
    close(penalty, v @ kron @ v)
    penalty.backward()
    trained = s2ft.delta if layer is S2FTLinear else s2ft.selected
    close(trained.grad, 2.0 * (kron @ v).reshape(d.shape[1], d.shape[0]).T)
    assert ewc_penalty(anchor, factors, given, strength=2.0) == 0


def test_s2ft_anchor_must_select_the_same_part():
    model, anchor, factors = two_tasks(S2FTLinear, "rows")
    state = dict(anchor.state_dict(), **{"body.index": torch.tensor([0, 1, 2])})
    with pytest.raises(ValueError, match="anchor: 'body' selects other rows"):
        ewc_penalty(model, factors, state, strength=1.0)
    state = dict(anchor.state_dict(), **{"body.delta": torch.ones(2, 5)})
    with pytest.raises(ValueError, match=r"anchor\['body.delta'\] must be a tensor of shape"):
        ewc_penalty(model, factors, state, strength=1.0)


def test_in_place_adamw_steps_with_the_penalty():
    torch.manual_seed(0)
    anchor = Classifier(hidden=6)
    model = copy.deepcopy(anchor)
    model.body = S2FTInPlaceLinear(model.body, rows=torch.tensor([1, 4]))
    factors = collect(model, BATCHES, dtype=torch.float64)
    optimizer = InPlaceAdamW(model, lr=1e-2)
    before = model.body.base.weight.detach().clone()
    loss = model(**BATCHES[0]).loss + ewc_penalty(model, factors, anchor.state_dict(),
                                                  strength=1.0)
    loss.backward()
    optimizer.step()
    changed = (model.body.base.weight != before).any(1)
    assert changed.tolist() == [False, True, False, False, True, False]
    assert ewc_penalty(model, factors, anchor, strength=1.0) > 0


def test_bad_arguments_are_named():
    model, anchor, factors = trained()
    with pytest.raises(ValueError, match="kind"):
        ewc_penalty(model, factors, anchor, strength=1.0, kind="full")
    with pytest.raises(ValueError, match="strength"):
        ewc_penalty(model, factors, anchor, strength=-1.0)
    with pytest.raises(ValueError, match="strength"):
        ewc_penalty(model, factors, anchor, strength=float("nan"))
    with pytest.raises(TypeError, match="strength"):
        ewc_penalty(model, factors, anchor, strength="1")
    with pytest.raises(TypeError, match="anchor"):
        ewc_penalty(model, factors, [1], strength=1.0)
    state = anchor.state_dict()
    del state["head.weight"]
    with pytest.raises(ValueError, match="anchor has no 'head.weight'"):
        ewc_penalty(model, factors, state, strength=1.0)
    with pytest.raises(ValueError, match=r"anchor\['body.weight'\] must be a tensor of shape"):
        ewc_penalty(model, factors, dict(anchor.state_dict(), **{"body.weight": torch.ones(1)}),
                    strength=1.0)
    with pytest.raises(ValueError, match="no module 'tail'"):
        ewc_penalty(model, {"tail": factors["head"]}, anchor, strength=1.0)
    with pytest.raises(ValueError, match=r"factors\['head'\] are for a weight of shape"):
        ewc_penalty(model, {"head": factors["body"]}, anchor, strength=1.0)
    f = factors["head"]
    with pytest.raises(ValueError, match="diagonal"):
        ewc_penalty(model, {"head": LayerFactors(f.a, f.g, f.tokens, f.bias)}, anchor,
                    strength=1.0, kind="diag")
    with pytest.raises(TypeError, match=r"factors\['head'\] must be a LayerFactors"):
        ewc_penalty(model, {"head": (f.a, f.g)}, anchor, strength=1.0)


def test_conv1d_layers_use_their_out_in_view():
    """GPT-2's Conv1D (weight stored (in, out)): factors over its (out, in) view, anchor
    weights read in the stored layout."""
    model = build("gpt2")
    name = "transformer.h.0.attn.c_proj"
    b = family_batch("gpt2")
    factors = collect(model, [dict(b, labels=b["input_ids"])], dtype=torch.float64,
                      modules=lambda n, m: n == name)
    assert list(factors) == [name] and factors[name].shape == (32, 33)
    anchor = copy.deepcopy(model)
    layer = model.get_submodule(name)
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * 0.1)
        layer.bias.add_(torch.randn_like(layer.bias) * 0.1)
    old = anchor.get_submodule(name)
    d = torch.cat([out_in_weight(layer) - out_in_weight(old), (layer.bias - old.bias)[:, None]], 1)
    penalty = ewc_penalty(model, factors, anchor.state_dict(), strength=0.5)
    close(penalty, materialised({name: d}, factors, 0.5, "kron"))
    moved = {name: factors[name].to("cpu")}
    assert torch.equal(ewc_penalty(model, moved, anchor, strength=0.5), penalty)


@pytest.mark.parametrize("symmetric", [True, False])
def test_kron_quadratic_gradient_and_its_backward_products(symmetric):
    """⟨D, G D A⟩'s gradient G D A + Gᵀ D Aᵀ, also twice; for symmetric factors (K-FAC's)
    the backward runs no product (the forward's G D A is the gradient), else two."""
    from torch.utils.flop_counter import FlopCounterMode

    from kronops.curvature.penalty import kron_quadratic
    torch.manual_seed(0)
    d = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    g, a = torch.randn(7, 7, dtype=torch.float64), torch.randn(5, 5, dtype=torch.float64)
    if symmetric:  # exactly (a sum commutes; a product G Gᵀ need not be, to the last bit)
        g, a = g + g.T, a + a.T
    value = kron_quadratic(d, g, a)
    with FlopCounterMode(display=False) as counter:
        (got,) = torch.autograd.grad(value, d)
    assert (counter.get_total_flops() == 0) == symmetric
    plain = (d * (g @ d @ a)).sum()
    (want,) = torch.autograd.grad(plain, d)
    assert relative_error(value, plain) < 1e-15 and relative_error(got, want) < 1e-14
    assert torch.autograd.gradgradcheck(lambda t: kron_quadratic(t, g, a), (d,))
    if symmetric:  # an in-place change is seen: the backward takes both products again
        with torch.no_grad():
            g[0, 1] += 1.0
        with FlopCounterMode(display=False) as counter:
            (got,) = torch.autograd.grad(kron_quadratic(d, g, a), d)
        assert counter.get_total_flops() > 0
        (want,) = torch.autograd.grad((d * (g @ d @ a)).sum(), d)
        assert relative_error(got, want) < 1e-14
