"""kronops adapters served in vLLM (kronops.serving.vllm): one engine, one mixed batch of
plain, KronA, LoKr, S²FT (adapter and in-place files), a folder holding a KronA file, PEFT
LoKr and PEFT LoRA requests with every LoRA slot taken. Plain rows are bit-identical to a
run with no adapters (the LoRA is activated last and takes the last slot, which vLLM's
PyTorch LoRA ops read for tokens without an adapter unless the kronops layers' extra zero
slot is there); kronops rows equal transformers with the same file loaded by
kronops.load_adapters, the PEFT rows transformers with their ΔW added. Then: adapters
evicted from the slots and from the CPU cache and loaded again; bad adapters refused with
the reason while the engine keeps serving.

Runs where vllm is importable (.ci/vllm builds that environment); skipped elsewhere.
"""
import gc
import math
import os
import re

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vllm is not importable here: the vLLM tests run in their own environment "
                   "(.ci/vllm, .venv-vllm)")

import kronops  # noqa: E402
from vllm_assets import (ADAPTERS, LORA, assets, hf_model,  # noqa: E402,F401  (fixtures)
                         more_assets, trained)

PROMPTS = ["the quick brown fox", "hello world kron adapter", "the lazy dog 12",
           "serving test the quick", "over the lazy dog 7", "the quick brown dog 3",
           "hello world", "jumps over the lazy fox 19", "the brown dog jumps 5",
           "the lazy fox jumps 8", "hello kron world 4"]
# every adapter kind but the LoRA, which takes the last slot
KRONOPS = list(ADAPTERS) + ["krona_dir", "peft_lokr"]
# one request per prompt: None is the plain model; every adapter appears, so with
# max_loras = len(KRONOPS) + 1 every slot is taken while plain rows run beside them
KINDS = [None, "krona", "s2ft", None, "lokr", "s2ft_inplace", "lora", "krona", None,
         "peft_lokr", "krona_dir"]
MAX_TOKENS = 6

# The tolerance, from the arithmetic: vLLM and transformers compute the same fp32 function
# with other summation orders (GEMM blocking, attention kernels), and the adapter terms (a
# Kronecker product applied as two small GEMMs, or a Δ on a few rows/columns) also round in
# another order than transformers' adapter layers do. A dot product of length k rounds with
# a typical error of about sqrt(k)·u of its terms' magnitude (u = 2^-24), k <= 256 here;
# each of the 2 blocks adds such errors to the residual stream, and a log-softmax passes an
# absolute logit error through at most doubled. So 4·sqrt(256)·u per block, 2 blocks:
# 7.6e-6; observed ~5e-7.
TOLERANCE = 4 * math.sqrt(256) * 2.0 ** -24 * 2


@pytest.fixture(scope="module")
def llm(assets):
    """One engine for the module (a start costs ~25 s and ~2 GB): fp32, eager, LoRA on with
    one slot per adapter; only the kronops plugin loads."""
    saved = {k: os.environ.get(k)
             for k in ("VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE")}
    os.environ.update(VLLM_PLUGINS="kronops", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    engine = vllm.LLM(model=str(assets[0]), dtype="float32", enforce_eager=True,
                      max_model_len=128, enable_lora=True, max_loras=len(KRONOPS) + 1,
                      max_lora_rank=8, seed=0)
    yield engine
    del engine
    gc.collect()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def generate(llm, requests, prompts=PROMPTS):
    params = vllm.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0)
    return llm.generate(prompts, params, lora_request=requests, use_tqdm=False)


def logprobs(output) -> list[float]:
    """The logprob of each generated token."""
    out = output.outputs[0]
    return [step[token].logprob for step, token in zip(out.logprobs, out.token_ids)]


def reference(folder, path, deltas, prompt_ids, generated) -> list[float]:
    """transformers' fp32 logprobs of ``generated`` after ``prompt_ids`` with the kronops
    adapter file at ``path`` loaded by kronops (None: the plain model), or with ``deltas``
    ({module: ΔW}) added by hooks."""
    model = hf_model(folder, path, deltas)
    ids = torch.tensor([list(prompt_ids) + list(generated)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(prompt_ids)
    return [float(lp[n + j - 1, t]) for j, t in enumerate(generated)]


def max_error(output, folder, path=None, deltas=None) -> float:
    """max |Δlogprob| of ``output``'s generated tokens against ``reference``."""
    expected = reference(folder, path, deltas, output.prompt_token_ids,
                         output.outputs[0].token_ids)
    return max(abs(a - b) for a, b in zip(logprobs(output), expected))


@pytest.fixture(scope="module")
def served(assets, more_assets):
    """{kind: (LoRARequest, kronops file for the reference or None, ΔW by module or None)}
    for every kind of ``KINDS``; ids 1, 2, ... in ``KRONOPS`` order, the LoRA's the highest."""
    _, files, (lora, factors) = assets
    scale = LORA["lora_alpha"] / LORA["r"]
    lokr, lokr_deltas = more_assets["peft_lokr"]
    kinds = {k: (files[k], files[k], None) for k in ADAPTERS}
    kinds.update(krona_dir=(more_assets["krona_dir"], files["krona"], None),
                 peft_lokr=(lokr, None, lokr_deltas),
                 lora=(lora, None, {n: scale * b @ a for n, (a, b) in factors.items()}))
    order = KRONOPS + ["lora"]
    return {k: (vllm.lora.request.LoRARequest(k, order.index(k) + 1, kinds[k][0]),
                *kinds[k][1:]) for k in order}


@pytest.fixture(scope="module")
def runs(llm, served):
    """(plain run with no adapters, the mixed run)"""
    plain = generate(llm, None)
    # the kronops adapters take the first slots, so the LoRA gets the last slot: the one
    # vLLM's LoRA ops read for tokens without an adapter (index -1) but for the extra slot
    generate(llm, [served[k][0] for k in KRONOPS], PROMPTS[:len(KRONOPS)])
    mixed = generate(llm, [None if k is None else served[k][0] for k in KINDS])
    return plain, mixed


def test_plain_rows_are_bit_identical_to_a_run_without_adapters(runs):
    plain, mixed = runs
    for i, kind in enumerate(KINDS):
        if kind is None:
            assert mixed[i].outputs[0].token_ids == plain[i].outputs[0].token_ids
            assert logprobs(mixed[i]) == logprobs(plain[i]), f"row {i}"


def test_adapter_rows_equal_transformers_with_the_adapter(runs, served, assets):
    folder = assets[0]
    plain, mixed = runs
    worst = {}
    for i, kind in enumerate(KINDS):
        out = mixed[i]
        path, deltas = served[kind][1:] if kind is not None else (None, None)
        error = max_error(out, folder, path, deltas)
        worst[kind] = max(worst.get(kind, 0.0), error)
        assert error <= TOLERANCE, f"row {i} ({kind}): max |Δlogprob| {error:.3g}"
        if kind is not None:  # the adapter changed the row
            changed = out.outputs[0].token_ids != plain[i].outputs[0].token_ids or max(
                abs(a - b) for a, b in zip(logprobs(out), logprobs(plain[i]))) > 1e-3
            assert changed, f"row {i} ({kind}) is the plain model's"
    print("max |Δlogprob| vs transformers:", {k: f"{v:.3g}" for k, v in worst.items()})


def new_adapters(folder, directory, kinds, first_id: int) -> list:
    """A fresh kronops file per entry of ``kinds`` (an ``ADAPTERS`` name), each with its own
    values; [(LoRARequest with ids from ``first_id``, file)]."""
    base, made = hf_model(folder), []
    for i, kind in enumerate(kinds):
        path = str(directory / f"{kind}_{first_id + i}.safetensors")
        kronops.save_adapters(trained(base, kind, first_id + i), path)
        made.append((vllm.lora.request.LoRARequest(f"new{first_id + i}", first_id + i, path),
                     path))
    return made


def check_rows(out, folder, files) -> None:
    """Each row of ``out`` within ``TOLERANCE`` of transformers with ``files[i]`` loaded (None:
    the plain model)."""
    for i, path in enumerate(files):
        error = max_error(out[i], folder, path)
        assert error <= TOLERANCE, f"row {i} ({path}): max |Δlogprob| {error:.3g}"


def test_a_slot_taken_over_by_another_adapter_serves_only_the_new_one(llm, runs, served,
                                                                       assets, tmp_path):
    """With every slot taken, a new adapter evicts the least recently used one and gets its
    slot: the slot's old factors or Δ must be gone (each layer's slot is cleared first)."""
    folder = assets[0]
    [(request, path)] = new_adapters(folder, tmp_path, ["lokr"], 99)
    s2ft, s2ft_path = served["s2ft"][:2]
    rows = [(request, path), (None, None), (s2ft, s2ft_path), (request, path)]
    out = generate(llm, [r for r, _ in rows], PROMPTS[:len(rows)])
    check_rows(out, folder, [p for _, p in rows])


def test_adapters_evicted_from_slots_and_cpu_cache_load_again(llm, runs, assets, tmp_path):
    """Ten new adapters in batches of three beside a plain row, more than the slots and the
    CPU cache (max_cpu_loras = max_loras = 7) hold; then the first three again, which by then
    have left the worker and are read from their files again: every row equals its adapter
    alone."""
    folder = assets[0]
    made = new_adapters(folder, tmp_path, ["krona", "s2ft", "lokr", "s2ft_inplace"] * 2
                        + ["krona", "s2ft"], 200)
    batches = [made[i:i + 3] for i in range(0, len(made), 3)]
    for batch in batches:
        rows = batch + [(None, None)]
        check_rows(generate(llm, [r for r, _ in rows], PROMPTS[:len(rows)]), folder,
                   [p for _, p in rows])
    loaded = set(llm.llm_engine.list_loras())
    first = batches[0]
    assert not {r.lora_int_id for r, _ in first} & loaded, f"not evicted: {loaded}"
    rows = [(None, None)] + first[::-1]
    check_rows(generate(llm, [r for r, _ in rows], PROMPTS[:len(rows)]), folder,
               [p for _, p in rows])
    assert {r.lora_int_id for r, _ in first} <= set(llm.llm_engine.list_loras())


def bad_adapters(folder, files, directory) -> dict:
    """{what is wrong: (adapter path, the reason the refusal names)}"""
    from transformers import LlamaConfig, LlamaForCausalLM
    bad = {}
    other = hf_model(folder)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    bad["other base"] = (str(directory / "other.safetensors"), "saved from another base model")
    kronops.save_adapters(trained(other, "krona", 1), bad["other base"][0])
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2)).eval()
    bad["shapes"] = (str(directory / "shapes.safetensors"), r"down_proj is 256->128 in the model, 128->64 in the file")
    kronops.save_adapters(kronops.apply_adapters(wider, "krona"), bad["shapes"][0])
    data = bytearray(open(files["krona"], "rb").read())
    data[-3] ^= 0xFF  # a tensor byte
    bad["corrupt"] = (str(directory / "corrupt.safetensors"), "does not match its checksum")
    open(bad["corrupt"][0], "wb").write(bytes(data))
    bad["KronA^B"] = (str(directory / "block.safetensors"), "KronA\\^B")
    kronops.save_adapters(kronops.apply_adapters(hf_model(folder), "krona_block"),
                          bad["KronA^B"][0])
    bad["missing"] = (str(directory / "no_such_adapter"), "no_such_adapter")
    return bad


def test_a_bad_adapter_is_refused_with_the_reason_and_the_engine_keeps_serving(
        llm, runs, served, assets, tmp_path):
    folder, files, _ = assets
    plain, mixed = runs
    good = served["krona"][0]
    for i, (what, (path, reason)) in enumerate(bad_adapters(folder, files, tmp_path).items()):
        request = vllm.lora.request.LoRARequest(f"bad {what}", 300 + i, path)
        with pytest.raises(ValueError, match=f"LoRA request {re.escape(repr('bad ' + what))}.* refused: .*{reason}"):
            generate(llm, [good, request], PROMPTS[:2])
        assert 300 + i not in llm.llm_engine.list_loras()
    # the engine still serves plain and adapted rows, and no refused request is pending
    kinds = [None, "krona", "peft_lokr", "s2ft"]
    out = generate(llm, [None if k is None else served[k][0] for k in kinds],
                   [PROMPTS[KINDS.index(k)] for k in kinds])
    assert len(out) == len(kinds)
    for row, kind in zip(out, kinds):
        reference_row = mixed[KINDS.index(kind)]
        if kind is None:
            assert row.outputs[0].token_ids == plain[0].outputs[0].token_ids
        error = max_error(row, folder, *(served[kind][1:] if kind else (None, None)))
        assert error <= TOLERANCE, f"{kind}: max |Δlogprob| {error:.3g}"
        assert row.outputs[0].token_ids == reference_row.outputs[0].token_ids, kind
