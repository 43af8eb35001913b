"""Benchmark cases of kronops.curvature on a small LLaMA-style model (transformers'
LlamaForCausalLM, random weights, nothing downloaded; skipped when transformers is absent).

``kfac_collect``: ``collect`` on one batch beside a plain training step of the same model
(forward, backward, AdamW: the floor, unchecked); collect's factors are checked against
``collect`` of the fp64 model. A second row does the same with ``every=2`` (every other
token; checked against the fp64 ``collect(every=2)``). ``ewc_penalty``: the K-FAC penalty and its gradient w.r.t.
every linear weight, from kronops' ``ewc_penalty``, from the same expression in plain
PyTorch on a list of tensors, and (when installed) from curvlinops' KFACLinearOperator with
our factors loaded, whose product G ΔW A is the gradient, and likewise nngeometry's
PMatKFAC with our factors as its data; all checked against the plain expression in fp64. The shapes name the factors' memory.
"""
import copy
import dataclasses
import warnings

import torch
from torch import nn

from kronops.curvature import collect, ewc_penalty

from .cases import INPUT_SETS, Case, element_bytes
from .optional import load_curvlinops, load_nngeometry, load_transformers

LR = 1e-4
STEP = 1e-2  # the size of the random ΔW entries the penalty weighs


def _model(config, dtype, device):
    transformers, _ = load_transformers()
    if transformers is None:
        return None
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(
        device=device, dtype=dtype)


def _factor_list(factors) -> list[torch.Tensor]:
    """Every layer's A and G, checked pairwise (no copy: a concatenation of 32 MiB took 7%
    of a collect call, a cost the training step beside it does not pay)."""
    return [t for f in factors.values() for t in (f.a, f.g)]


def _factor_bytes(factors) -> int:
    return sum(t.numel() * t.element_size() for f in factors.values() for t in (f.a, f.g))


def _linear_flops(model, tokens) -> int:
    """2·in·out·tokens over the model's linear layers: one forward GEMM each."""
    return sum(2 * m.in_features * m.out_features * tokens
               for m in model.modules() if isinstance(m, nn.Linear))


def _name(config, batch, seq) -> str:
    return (f"LLaMA h{config['hidden_size']} L{config['num_hidden_layers']} "
            f"{config['num_attention_heads']}/{config['num_key_value_heads']} heads, "
            f"{batch}x{seq} tokens")


def kfac_collect_cases(config: dict, batch: int, seq: int, dtype, device):
    """``collect`` on one batch of ``batch``×``seq`` tokens against a training step."""
    base = _model(config, dtype, device)
    if base is None:
        return []
    batches = [dict(input_ids=ids, labels=ids) for ids in
               (torch.randint(0, config["vocab_size"], (batch, seq), device=device)
                for _ in range(INPUT_SETS))]
    trained = copy.deepcopy(base)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=LR, foreach=True)

    def step(i):
        loss = trained(**batches[i]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    tokens = batch * seq
    linear = _linear_flops(base, tokens)
    size = _factor_bytes(collect(base, [batches[0]], dtype=torch.float32))
    shape = f"{_name(config, batch, seq)}, factors {size / 2 ** 20:.1f} MiB"
    params = sum(p.numel() for p in base.parameters())
    cases = []
    for every in (1, 2):
        def factors(i, every=every):
            return _factor_list(collect(base, [batches[i]], dtype=torch.float32, every=every))

        def reference(every=every):
            return _factor_list(collect(copy.deepcopy(base).double(), [batches[0]],
                                 dtype=torch.float64, every=every))

        factor_flops = sum(2 * (m.in_features ** 2 + m.out_features ** 2) * tokens // every
                           for m in base.modules() if isinstance(m, nn.Linear))
        # Work: the forward and the dX half of the backward, and the two factor GEMMs per
        # layer (full GEMMs; collect's upper block triangles do 0.58-1× of them); bytes:
        # the weights read and the factors written.
        cases.append(Case("kfac_collect", "one batch" + (f", every={every}" if every > 1 else ""),
                          shape, tokens, params * element_bytes(dtype) + size,
                          2 * linear + factor_flops,
                          {"kronops collect": factors, "naive (plain training step)": step},
                          reference, unchecked={"naive (plain training step)"}))
    return cases


def _plain_penalty(weights, anchors, factors, strength):
    """½·strength·Σ ⟨ΔW, G ΔW A⟩ over lists of (out, in) weights, anchors and LayerFactors."""
    deltas = [w - w0 for w, w0 in zip(weights, anchors)]
    return 0.5 * strength * sum((d * (f.g @ d @ f.a)).sum() for d, f in zip(deltas, factors))


def _curvlinops_provider(model, ids, names, weights, anchors, factors):
    """curvlinops' operator over ``weights`` with our factors loaded (``ids``: the batch they
    came from, which it only looks at): its product K vec(ΔW) is the penalty's gradient
    (strength 1) and ½⟨ΔW, KΔW⟩ the penalty. None when curvlinops is absent."""
    curvlinops, _ = load_curvlinops()
    if curvlinops is None:
        return None
    op = curvlinops.KFACLinearOperator(
        model, nn.CrossEntropyLoss(), weights, [(ids, ids)], fisher_type="empirical",
        kfac_approx="expand", separate_weight_and_bias=False, check_deterministic=False,
        num_data=1, num_per_example_loss_terms=1)
    state = op.state_dict()
    state.update(input_covariances={n: factors[n].a for n in names},
                 gradient_covariances={n: factors[n].g for n in names})
    with warnings.catch_warnings():  # "overwrites the model's parameters": with their own values
        warnings.simplefilter("ignore")
        op.load_state_dict(state)

    def run(i):
        deltas = [(w - w0).detach() for w, w0 in zip(weights, anchors)]
        products = op @ deltas
        penalty = 0.5 * sum((d * k).sum() for d, k in zip(deltas, products))
        return torch.cat([penalty.reshape(1), *(k.flatten() for k in products)])
    return run


def _nngeometry_provider(model, names, weights, anchors, factors):
    """nngeometry's PMatKFAC over the layers ``names`` with our factors as its data: its
    ``mv`` G ΔW A is the penalty's gradient (strength 1) and ½⟨ΔW, G ΔW A⟩ the penalty.
    None when nngeometry is absent."""
    objects, _ = load_nngeometry()
    if objects is None:
        return None
    from nngeometry.backend import TorchHooksJacobianBackend
    from nngeometry.layercollection import LayerCollection
    layers = LayerCollection()
    for n in names:
        layers.add_layer_from_model(model, model.get_submodule(n))
    kfac = objects.PMatKFAC(generator=TorchHooksJacobianBackend(model, layer_collection=layers),
                            data={n: (factors[n].a, factors[n].g) for n in names})

    def run(i):
        deltas = [(w - w0).detach() for w, w0 in zip(weights, anchors)]
        v = objects.PVector(layer_collection=layers,
                            dict_repr={n: (d,) for n, d in zip(names, deltas)})
        out = kfac.mv(v).to_dict()
        products = [out[n][0] for n in names]
        penalty = 0.5 * sum((d * k).sum() for d, k in zip(deltas, products))
        return torch.cat([penalty.reshape(1), *(k.flatten() for k in products)])
    return run


def ewc_penalty_cases(config: dict, batch: int, seq: int, dtype, device):
    """The penalty over every linear layer and its gradient, factors from one batch."""
    base = _model(config, dtype, device)
    if base is None:
        return []
    ids = torch.randint(0, config["vocab_size"], (batch, seq), device=device)
    factors = collect(base, [dict(input_ids=ids, labels=ids)], dtype=dtype)
    anchor = copy.deepcopy(base)
    model = copy.deepcopy(base)
    names = list(factors)
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    anchors = [anchor.get_submodule(n).weight.detach() for n in names]
    with torch.no_grad():
        for w in weights:
            w.add_(STEP * torch.randn_like(w))
    ordered = [factors[n] for n in names]

    def gradient(penalty):
        return torch.cat([penalty.detach().reshape(1),
                          *(g.flatten() for g in torch.autograd.grad(penalty, weights))])

    def reference():
        w64 = [w.detach().double().requires_grad_() for w in weights]
        f64 = [dataclasses.replace(f, a=f.a.double(), g=f.g.double()) for f in ordered]
        penalty = _plain_penalty(w64, [w.double() for w in anchors], f64, 1.0)
        return torch.cat([penalty.detach().reshape(1),
                          *(g.flatten() for g in torch.autograd.grad(penalty, w64))])

    providers = {
        "kronops": lambda i: gradient(ewc_penalty(model, factors, anchor, strength=1.0)),
        "composite (plain PyTorch)": lambda i: gradient(
            _plain_penalty(weights, anchors, ordered, 1.0)),
    }
    theirs = _curvlinops_provider(model, ids, names, weights, anchors, factors)
    if theirs is not None:
        providers["curvlinops KFACLinearOperator"] = theirs
    theirs = _nngeometry_provider(model, names, weights, anchors, factors)
    if theirs is not None:
        providers["nngeometry PMatKFAC"] = theirs
    pair_flops = sum(2 * w.shape[0] * w.shape[1] * sum(w.shape) for w in weights)
    size = _factor_bytes(factors)
    shape = f"{_name(config, batch, seq)}, {len(names)} layers, factors {size / 2 ** 20:.1f} MiB"
    elements = sum(w.numel() for w in weights)
    # Fused work: ΔW's two GEMMs per layer once (G ΔW A is the gradient); the factors and
    # both weights read, the gradient written.
    return [Case("ewc_penalty", "forward+backward", shape, elements,
                 size + 3 * elements * element_bytes(dtype), pair_flops, providers, reference)]
