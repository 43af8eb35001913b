"""kronops adapters served in vLLM (kronops.serving.vllm): one engine, one mixed batch of
plain, KronA, LoKr, S²FT (adapter and in-place files) and PEFT LoRA requests with every
LoRA slot taken. Plain rows are bit-identical to a run with no adapters (the LoRA is
activated last and takes the last slot, which vLLM's PyTorch LoRA ops read for tokens
without an adapter unless the kronops layers' extra zero slot is there); kronops
rows equal transformers with the same file loaded by kronops.load_adapters, the LoRA row
transformers with the LoRA term added.

Runs where vllm is importable (.ci/vllm builds that environment); skipped elsewhere.
"""
import gc
import math
import os

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vllm is not importable here: the vLLM tests run in their own environment "
                   "(.ci/vllm, .venv-vllm)")

import kronops  # noqa: E402
from vllm_assets import ADAPTERS, LORA, assets  # noqa: E402,F401  (assets: a fixture)

PROMPTS = ["the quick brown fox", "hello world kron adapter", "the lazy dog 12",
           "serving test the quick", "over the lazy dog 7", "the quick brown dog 3",
           "hello world", "jumps over the lazy fox 19", "the brown dog jumps 5"]
# one request per prompt: None is the plain model; every adapter appears, so with
# max_loras = len(ADAPTERS) + 1 every slot is taken while plain rows run beside them
KINDS = [None, "krona", "s2ft", None, "lokr", "s2ft_inplace", "lora", "krona", None]
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
    saved = {k: os.environ.get(k) for k in ("VLLM_PLUGINS", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ.update(VLLM_PLUGINS="kronops", VLLM_CPU_KVCACHE_SPACE="1")
    engine = vllm.LLM(model=str(assets[0]), dtype="float32", enforce_eager=True,
                      max_model_len=128, enable_lora=True, max_loras=len(ADAPTERS) + 1,
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


def reference(folder, path, lora, prompt_ids, generated) -> list[float]:
    """transformers' fp32 logprobs of ``generated`` after ``prompt_ids`` with the adapter
    file at ``path`` loaded by kronops (None: the plain model), or with ``lora``
    ({module: (A, B)}) added by hooks."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if path is not None:
        model = kronops.load_adapters(model, path).eval()
    scale = LORA["lora_alpha"] / LORA["r"]
    for name, (a, b) in (lora or {}).items():
        model.get_submodule(name).register_forward_hook(
            lambda module, args, y, a=a, b=b: y + scale * (args[0] @ a.T) @ b.T)
    ids = torch.tensor([list(prompt_ids) + list(generated)])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(prompt_ids)
    return [float(lp[n + j - 1, t]) for j, t in enumerate(generated)]


@pytest.fixture(scope="module")
def runs(llm, assets):
    """(plain run with no adapters, the mixed run)"""
    _, files, (lora, _) = assets
    paths = dict(files, lora=lora)
    ids = {name: i + 1 for i, name in enumerate(paths)}  # the LoRA's is the highest
    request = {k: vllm.lora.request.LoRARequest(k, ids[k], paths[k]) for k in paths}
    plain = generate(llm, None)
    # the kronops adapters take slots 0 to 3 first, so the LoRA gets the last slot: the one
    # vLLM's LoRA ops read for tokens without an adapter (index -1) but for the extra slot
    generate(llm, [request[k] for k in ADAPTERS], PROMPTS[:len(ADAPTERS)])
    mixed = generate(llm, [None if k is None else request[k] for k in KINDS])
    return plain, mixed


def test_plain_rows_are_bit_identical_to_a_run_without_adapters(runs):
    plain, mixed = runs
    for i, kind in enumerate(KINDS):
        if kind is None:
            assert mixed[i].outputs[0].token_ids == plain[i].outputs[0].token_ids
            assert logprobs(mixed[i]) == logprobs(plain[i]), f"row {i}"


def test_adapter_rows_equal_transformers_with_the_file_loaded(runs, assets):
    folder, files, (_, lora) = assets
    plain, mixed = runs
    worst = {}
    for i, kind in enumerate(KINDS):
        out = mixed[i]
        expected = reference(folder, files.get(kind), lora if kind == "lora" else None,
                             out.prompt_token_ids, out.outputs[0].token_ids)
        got = logprobs(out)
        error = max(abs(a - b) for a, b in zip(got, expected))
        worst[kind] = max(worst.get(kind, 0.0), error)
        assert error <= TOLERANCE, f"row {i} ({kind}): max |Δlogprob| {error:.3g}"
        if kind is not None:  # the adapter changed the row
            changed = out.outputs[0].token_ids != plain[i].outputs[0].token_ids or max(
                abs(a - b) for a, b in zip(got, logprobs(plain[i]))) > 1e-3
            assert changed, f"row {i} ({kind}) is the plain model's"
    print("max |Δlogprob| vs transformers:", {k: f"{v:.3g}" for k, v in worst.items()})


def test_a_slot_taken_over_by_another_adapter_serves_only_the_new_one(llm, runs, assets,
                                                                       tmp_path):
    """With every slot taken, a new adapter evicts the least recently used one and gets its
    slot: the slot's old factors or Δ must be gone (each layer's slot is cleared first)."""
    from transformers import AutoModelForCausalLM
    from vllm_assets import trained
    folder, files, _ = assets
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    path = str(tmp_path / "krona_new.safetensors")
    kronops.save_adapters(trained(base, "lokr", 99), path)
    request = vllm.lora.request.LoRARequest("krona_new", 99, path)
    kinds = [path, None, files["s2ft"], path]
    s2ft_id = list(ADAPTERS).index("s2ft") + 1  # its id in ``runs``
    out = generate(llm, [None if k is None else
                         request if k == path else
                         vllm.lora.request.LoRARequest("s2ft", s2ft_id, k) for k in kinds],
                   PROMPTS[:len(kinds)])
    for i, kind in enumerate(kinds):
        expected = reference(folder, kind, None, out[i].prompt_token_ids,
                             out[i].outputs[0].token_ids)
        error = max(abs(a - b) for a, b in zip(logprobs(out[i]), expected))
        assert error <= TOLERANCE, f"row {i}: max |Δlogprob| {error:.3g}"
