"""merge_models(): "kron" against the materialised solve of
(Σ_i A_i⊗G_i + γI) vec(W) = Σ_i (A_i⊗G_i) vec(W_i) + γ vec(W̄) (torch.kron,
torch.linalg.solve, vec stacking columns) in fp64; "input" and "diag" against their closed
forms; "mean"; identical models; S²FT deltas; refusals by name.

Tolerances: "kron" stops its conjugate gradient at a relative residual of CG_TOLERANCE, so
its relative error is at most cond(system)·CG_TOLERANCE (plus fp64 round-off, 1e-12 of
room); the closed forms are a few fp64 products and one solve of a well-damped system: 1e-10.
"""
import copy

import pytest
import torch
from curvature_models import Classifier, batch
from models import build, family_batch

from kronops.curvature import CG_TOLERANCE, collect, merge_models
from kronops.s2ft import S2FTLinear
from kronops.testing import relative_error

FP64 = 1e-10
DAMPING = 1e-3


def trained(count, bias=True, diagonal=False, wrap=None):
    """``count`` copies of one model, each moved and with factors of its own batches."""
    torch.manual_seed(0)
    base = Classifier(hidden=6, bias=bias)
    if wrap is not None:
        base.body = wrap(base.body)
    models, factors = [], []
    for i in range(count):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        models.append(model)
        factors.append(collect(model, [batch(10 * i + 1, pad=1), batch(10 * i + 2, t=4)],
                               dtype=torch.float64, diagonal=diagonal))
    return models, factors


def with_bias(state, name, bias=True):
    w = state[f"{name}.weight"]
    return torch.cat([w, state[f"{name}.bias"][:, None]], 1) if bias else w


def solve_materialised(ws, fisher, damping):
    """(Σ F_i + γI)⁻¹ (Σ F_i vec(W_i) + γ vec(W̄)), F_i (out'·in')² matrices, W (out', in')."""
    mean = torch.stack(ws).mean(0)
    vec = [w.T.reshape(-1) for w in ws]
    system = sum(fisher) + damping * torch.eye(vec[0].numel(), dtype=torch.float64)
    rhs = sum(f @ v for f, v in zip(fisher, vec)) + damping * mean.T.reshape(-1)
    x = torch.linalg.solve(system, rhs)
    return x.reshape(mean.shape[1], mean.shape[0]).T, torch.linalg.cond(system)


@pytest.mark.parametrize("count", [2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_kron_equals_the_materialised_solve(count, bias):
    models, factors = trained(count, bias)
    merged = merge_models(models, factors, kind="kron", damping=DAMPING)
    for name in ("body", "head"):
        ws = [with_bias(m.state_dict(), name, bias) for m in models]
        fisher = [torch.kron(f[name].a, f[name].g) for f in factors]
        expected, cond = solve_materialised(ws, fisher, DAMPING)
        error = relative_error(with_bias(merged, name, bias), expected)
        assert error <= cond * CG_TOLERANCE + 1e-12, (error, cond)


def test_input_equals_its_closed_form():
    models, factors = trained(3)
    merged = merge_models(models, factors, kind="input", damping=DAMPING)
    for name in ("body", "head"):
        ws = [with_bias(m.state_dict(), name) for m in models]
        eye = torch.eye(factors[0][name].g.shape[0], dtype=torch.float64)
        expected, _ = solve_materialised(ws, [torch.kron(f[name].a, eye) for f in factors],
                                         DAMPING)
        assert relative_error(with_bias(merged, name), expected) <= FP64


def test_diag_equals_its_closed_form():
    models, factors = trained(3, diagonal=True)
    merged = merge_models(models, factors, kind="diag", damping=DAMPING)
    for name in ("body", "head"):
        ws = [with_bias(m.state_dict(), name) for m in models]
        fs = [f[name].diag for f in factors]
        expected = (sum(f * w for f, w in zip(fs, ws)) + DAMPING * sum(ws) / 3) / \
            (sum(fs) + DAMPING)
        assert relative_error(with_bias(merged, name), expected) <= FP64


def test_mean_and_layers_without_factors():
    models, factors = trained(3)
    states = [m.state_dict() for m in models]
    mean = {k: sum(s[k] for s in states) / 3 for k in states[0]}
    merged = merge_models(models, kind="mean")
    assert merged.keys() == mean.keys()
    for k in mean:
        assert relative_error(merged[k], mean[k]) <= FP64
    head_only = merge_models(states, [{"head": f["head"]} for f in factors], kind="kron",
                             damping=DAMPING)
    for k in ("body.weight", "body.bias"):
        assert relative_error(head_only[k], mean[k]) <= FP64
    assert relative_error(head_only["head.weight"], mean["head.weight"]) > 1e-6
    model = copy.deepcopy(models[0])
    model.load_state_dict(head_only)


@pytest.mark.parametrize("kind", ["kron", "input", "diag", "mean"])
def test_identical_models_merge_to_themselves(kind):
    models, factors = trained(2, diagonal=True)
    merged = merge_models([models[0]] * 3, [factors[0], factors[1], factors[0]], kind=kind,
                          damping=DAMPING)
    for k, v in models[0].state_dict().items():
        assert relative_error(merged[k], v) <= FP64, k


def test_s2ft_deltas_merge_with_their_restricted_factors():
    def wrap(body):
        return S2FTLinear(body, rows=torch.tensor([0, 2, 3]), delta_dtype=torch.float64)

    models, factors = trained(2, wrap=wrap)
    merged = merge_models(models, factors, kind="kron", damping=DAMPING)
    ws = [m.body.delta.detach() for m in models]
    fisher = [torch.kron(f["body"].a, f["body"].g) for f in factors]
    expected, cond = solve_materialised(ws, fisher, DAMPING)
    assert merged["body.delta"].shape == factors[0]["body"].shape
    assert relative_error(merged["body.delta"], expected) <= cond * CG_TOLERANCE + 1e-12
    assert torch.equal(merged["body.index"], models[0].body.chosen.index)
    model = copy.deepcopy(models[0])
    model.load_state_dict(merged)


def test_bad_arguments_are_named():
    models, factors = trained(2)
    with pytest.raises(ValueError, match="kind"):
        merge_models(models, factors, kind="fisher", damping=1.0)
    with pytest.raises(ValueError, match="damping"):
        merge_models(models, factors)
    with pytest.raises(ValueError, match="damping"):
        merge_models(models, factors, damping=0.0)
    with pytest.raises(TypeError, match="damping"):
        merge_models(models, factors, damping="1")
    with pytest.raises(ValueError, match="models"):
        merge_models(models[:1], factors[:1], damping=1.0)
    with pytest.raises(TypeError, match=r"models\[1\]"):
        merge_models([models[0], 3], factors, damping=1.0)
    with pytest.raises(ValueError, match=r"models\[1\] has other entries"):
        merge_models([models[0], {"head.weight": models[1].head.weight}], factors, damping=1.0)
    with pytest.raises(ValueError, match="one per model"):
        merge_models(models, factors[:1], damping=1.0)
    with pytest.raises(ValueError, match=r"factors\[1\] covers other layers"):
        merge_models(models, [factors[0], {"head": factors[1]["head"]}], damping=1.0)
    with pytest.raises(ValueError, match=r"factors\[1\]\['head'\] are for another weight"):
        merge_models(models, [factors[0], dict(factors[1], head=factors[1]["body"])],
                     damping=1.0)
    with pytest.raises(ValueError, match="diagonal"):
        merge_models(models, factors, kind="diag", damping=1.0)
    with pytest.raises(ValueError, match="no module 'tail'"):
        merge_models(models, [{"tail": f["head"]} for f in factors], damping=1.0)
    unbiased = [Classifier(hidden=6, bias=False) for _ in range(2)]
    with pytest.raises(ValueError, match="no 'head.bias'"):
        merge_models([m.state_dict() for m in unbiased], [{"head": f["head"]} for f in factors],
                     damping=1.0)


def test_conv1d_weights_merge_through_their_out_in_view():
    """GPT-2's Conv1D (weights stored (in, out)), one model given as a module for the
    layout, one as a state_dict; fp32 models: the fp64 result is rounded once to fp32
    (2⁻²⁴ relative per entry, 1e-6 of room)."""
    name = "transformer.h.0.attn.c_proj"
    b = family_batch("gpt2")
    models, factors = [], []
    for seed in range(2):
        model = build("gpt2", dtype=torch.float32)
        layer = model.get_submodule(name)
        with torch.no_grad():
            torch.manual_seed(seed)
            layer.weight.add_(torch.randn_like(layer.weight) * 0.1)
        models.append(model)
        factors.append(collect(model, [dict(b, labels=b["input_ids"])], dtype=torch.float64,
                               modules=lambda n, m: n == name))
    merged = merge_models([models[0], models[1].state_dict()], factors, damping=DAMPING)
    ws = [torch.cat([m.get_submodule(name).weight.T, m.get_submodule(name).bias[:, None]],
                    1).detach().double() for m in models]
    expected, cond = solve_materialised(ws, [torch.kron(f[name].a, f[name].g) for f in factors],
                                        DAMPING)
    got = torch.cat([merged[f"{name}.weight"].T, merged[f"{name}.bias"][:, None]], 1)
    assert merged[f"{name}.weight"].dtype == torch.float32
    assert relative_error(got.double(), expected) <= cond * CG_TOLERANCE + 1e-6
