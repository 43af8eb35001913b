"""Equivalence: K optimizer steps with an S²FT plan == full fine-tuning with gradients masked
to the plan (adapter mode after merge, in-place mode directly), with and without permutation."""
import copy
import io

import pytest
import torch
from conftest import assert_close
from models import llama_batch, tiny_llama
from s2ft_plans import apply_s2ft, gqa_plan

from kronops import adapters, s2ft

STEPS = 4
LR = {"sgd": 0.5, "adamw": 0.01}


def masks(model, plan):
    """{parameter name: 0/1 mask} of the weights the plan trains, in the original layout."""
    out = {}
    for b in adapters.find_blocks(model):
        entry = plan.blocks[b.name]
        group = b.num_heads // b.num_kv_heads
        q = [h * 8 + i for h in entry["heads"] for i in range(8)]
        kv = [g * 8 + i for g in sorted({h // group for h in entry["heads"]}) for i in range(8)]
        ch = entry["channels"]
        for name, side, idx in [("self_attn.q_proj", 0, q), ("self_attn.k_proj", 0, kv),
                                ("self_attn.v_proj", 0, kv), ("self_attn.o_proj", 1, q),
                                ("mlp.gate_proj", 0, ch), ("mlp.up_proj", 0, ch),
                                ("mlp.down_proj", 1, ch)]:
            w = model.get_parameter(f"{b.name}.{name}.weight")
            mask = torch.zeros_like(w)
            mask.index_fill_(side, torch.tensor(idx, dtype=torch.int64), 1.0)
            out[f"{b.name}.{name}.weight"] = mask
    return out


def full_finetune_masked(model, plan, optimizer, batches):
    model = copy.deepcopy(model)
    mask = masks(model, plan)
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in mask)
    trained = [params[n] for n in mask]
    opt = torch.optim.SGD(trained, lr=LR["sgd"]) if optimizer == "sgd" else \
        torch.optim.AdamW(trained, lr=LR["adamw"], weight_decay=0.0)
    for b in batches:
        opt.zero_grad()
        model(**b).loss.backward()
        for n in mask:
            params[n].grad *= mask[n]
        opt.step()
    return model


def s2ft_finetune(model, plan, optimizer, batches, mode, permute):
    model = copy.deepcopy(model)
    apply_s2ft(model, plan, mode=mode, permute=permute,
               **(dict(delta_dtype=torch.float64) if mode == "adapter" else {}))
    if mode == "adapter":
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trained, lr=LR["sgd"]) if optimizer == "sgd" else \
            torch.optim.AdamW(trained, lr=LR["adamw"], weight_decay=0.0)
    else:
        opt = s2ft.InPlaceSGD(model, lr=LR["sgd"]) if optimizer == "sgd" else \
            s2ft.InPlaceAdamW(model, lr=LR["adamw"], weight_decay=0.0)
    for b in batches:
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    if mode == "adapter":
        adapters.merge_adapters(model)
    if permute:
        adapters.unpermute(model)
    return {n.replace(".base.", "."): p for n, p in model.named_parameters()
            if not n.endswith((".delta", ".selected"))}


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["adapter", "inplace"])
@pytest.mark.parametrize("permute", [False, True])
def test_equivalent_to_masked_full_finetuning(optimizer, mode, permute):
    model = tiny_llama(torch.float64)
    plan = gqa_plan(model)
    batches = [llama_batch() for _ in range(STEPS)]
    reference = dict(full_finetune_masked(model, plan, optimizer, batches).named_parameters())
    result = s2ft_finetune(model, plan, optimizer, batches, mode, permute)
    assert set(result) == set(reference)
    changed = 0
    for name, p in result.items():
        assert_close(p, reference[name], torch.float64, name)
        changed += int(not torch.equal(reference[name], model.get_parameter(name)))
    assert changed == 14  # every trained projection moved; nothing else did


def test_inplace_adamw_weight_decay_only_on_the_selection(triton_backend):
    """Through the Triton kernel (interpreter on CPU): decay touches only the submatrix."""
    model = tiny_llama(torch.float32)
    original = copy.deepcopy(model)
    apply_s2ft(model, gqa_plan(model), mode="inplace")
    opt = s2ft.InPlaceAdamW(model, lr=0.01, weight_decay=0.5)
    model(**llama_batch()).loss.backward()
    opt.step()
    mask = masks(original, gqa_plan(original))
    state = {n.replace(".base.", "."): p for n, p in model.named_parameters()}
    for name, p in original.named_parameters():
        moved = state[name] != p
        if name in mask:
            assert moved[mask[name] == 0].sum() == 0 and moved[mask[name] == 1].any(), name
        else:
            assert not moved.any(), name
    sizes = [v.numel() for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert sum(sizes) == 2 * sum(int(m.sum()) for m in mask.values())


def test_inplace_optimizer_needs_inplace_layers():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no S2FTInPlaceLinear layers"):
        s2ft.InPlaceAdamW(model)
    apply_s2ft(model, gqa_plan(model), mode="inplace")
    with pytest.raises(ValueError, match="betas must be"):
        s2ft.InPlaceAdamW(model, betas=(0.9, 1.0))
    with pytest.raises(RuntimeError, match="nothing to merge"):
        model.model.layers[0].mlp.up_proj.merge()
    with pytest.raises(ValueError, match="no S²FT adapter layers"):
        adapters.merge_adapters(model)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["adapter", "inplace"])
def test_equivalent_through_triton_kernels(optimizer, mode, triton_backend):
    """The same equivalence in fp32 with the gathered kernels (and fused AdamW) doing the work."""
    model = tiny_llama(torch.float32)
    plan = gqa_plan(model)
    batches = [llama_batch() for _ in range(2)]
    reference = dict(full_finetune_masked(model, plan, optimizer, batches).named_parameters())
    result = s2ft_finetune(model, plan, optimizer, batches, mode, permute=False)
    for name, p in result.items():
        start = model.get_parameter(name)
        moved, ref_moved = p - start, reference[name] - start
        assert_close(p, reference[name], torch.float32, name)
        if ref_moved.any():  # the update itself, not just the (large) weight, agrees
            assert (moved - ref_moved).norm() <= 1e-3 * ref_moved.norm(), name


def test_inplace_adamw_resume_keeps_fp32_moments():
    """save -> load -> step equals an uninterrupted run on a bf16 weight: the loaded moments
    stay fp32 (torch.optim's loader would cast them to the bf16 parameter dtype)."""
    from kronops.s2ft.modules import S2FTInPlaceLinear

    def fresh():
        torch.manual_seed(0)
        base = torch.nn.Linear(16, 12).to(torch.bfloat16)
        return torch.nn.Sequential(S2FTInPlaceLinear(base, rows=torch.tensor([1, 4, 5, 9])))

    inputs = [torch.randn(8, 16, dtype=torch.bfloat16) for _ in range(6)]

    def train(model, opt, xs):
        for x in xs:
            opt.zero_grad()
            model(x).float().square().sum().backward()
            opt.step()

    def optimizer(model):
        return s2ft.InPlaceAdamW(model, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.1)

    straight = fresh()
    straight_opt = optimizer(straight)
    train(straight, straight_opt, inputs)

    first = fresh()
    first_opt = optimizer(first)
    train(first, first_opt, inputs[:3])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    resumed = fresh()
    resumed.load_state_dict(saved["model"])
    resumed_opt = optimizer(resumed)
    resumed_opt.load_state_dict(saved["opt"])
    state = resumed_opt.state[resumed[0].selected]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    train(resumed, resumed_opt, inputs[3:])

    assert torch.equal(resumed[0].base.weight, straight[0].base.weight)
    expected = straight_opt.state[straight[0].selected]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key], expected[key]), key
    assert state["step"] == expected["step"] == 6
