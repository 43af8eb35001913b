"""Benchmark cases of S²FT's in-place training: one AdamW step on the selected rows.

Providers, all with weight decay 0 so they compute the same update: kronops'
InPlaceAdamW (fused Triton kernel on CUDA; state sized to the submatrix); torch AdamW
(foreach) on a separate delta of the submatrix's shape; and the naive reference, torch
AdamW over the whole weight with the gradient masked to the selection (full-size state).
Each provider's first step is checked against the fp64 AdamW step.
"""
import torch
from torch import nn

from kronops.s2ft import InPlaceAdamW
from kronops.s2ft.modules import S2FTInPlaceLinear

from .cases import Case, element_bytes

LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8


def _adamw_first_step(w, g):
    """w - lr * m_hat / (sqrt(v_hat) + eps) after one step from zero state, in fp64."""
    m_hat, v_hat = g, g * g
    return w - LR * m_hat / (v_hat.sqrt() + EPS)


def inplace_adamw_cases(in_features, out_features, fraction, dtype, device):
    """One optimizer step on ``fraction`` of the rows of an (out, in) weight."""
    count = max(1, round(out_features * fraction))
    sel = torch.randperm(out_features, device=device)[:count].sort().values
    weight = torch.randn(out_features, in_features, device=device, dtype=dtype)
    grad = torch.randn(count, in_features, device=device, dtype=dtype)

    layer = S2FTInPlaceLinear(nn.Linear(in_features, out_features, device=device, dtype=dtype),
                              rows=sel)
    with torch.no_grad():
        layer.base.weight.copy_(weight)
    layer.selected.grad = grad.clone()
    inplace = InPlaceAdamW(layer, lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0)

    delta = torch.zeros(count, in_features, device=device, dtype=dtype, requires_grad=True)
    delta.grad = grad.clone()
    on_delta = torch.optim.AdamW([delta], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0,
                                 foreach=True)

    full = nn.Parameter(weight.clone())
    full.grad = torch.zeros_like(full).index_copy_(0, sel, grad)
    on_full = torch.optim.AdamW([full], lr=LR, betas=BETAS, eps=EPS, weight_decay=0.0,
                                foreach=True)

    def step_inplace(i):
        inplace.step()
        return layer.base.weight[sel]

    def step_delta(i):
        on_delta.step()
        return weight[sel] + delta.detach()

    def step_full(i):
        on_full.step()
        return full.detach()[sel]

    elt = element_bytes(dtype)
    n = count * in_features
    # Read w, g, m, v; write w, m, v (state in fp32).
    nbytes = n * (3 * elt + 4 * 4)
    return [Case("InPlaceAdamW", "step", f"{out_features}x{in_features} rows {count}/{out_features}",
                 n, nbytes, 10 * n,
                 {"kronops": step_inplace, "torch AdamW on a delta": step_delta,
                  "naive (full AdamW, masked grad)": step_full},
                 lambda: _adamw_first_step(weight[sel].double(), grad.double()))]
