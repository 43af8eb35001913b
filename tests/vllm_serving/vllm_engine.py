"""What the vLLM engine tests share: an engine of the tiny LLaMA (fp32, eager, LoRA on, only the
kronops plugin), greedy generation with logprobs, the requests of every adapter kind of
``vllm_assets``, and transformers' logprobs for the same tokens as the reference."""
import contextlib
import gc
import math
import os

import pytest
import torch
import vllm
from vllm.lora.request import LoRARequest
from vllm_assets import ADAPTERS, LORA, hf_model

MAX_TOKENS = 6
# every adapter kind but the LoRA, which comes last (the highest id)
KRONOPS = list(ADAPTERS) + ["krona_dir", "peft_lokr"]

# The tolerance, from the arithmetic: vLLM and transformers compute the same fp32 function
# with other summation orders (GEMM blocking, attention kernels), and the adapter terms (a
# Kronecker product applied as two small GEMMs, or a Δ on a few rows/columns) also round in
# another order than transformers' adapter layers do. A dot product of length k rounds with
# a typical error of about sqrt(k)·u of its terms' magnitude (u = 2^-24), k <= 256 here;
# each of the 2 blocks adds such errors to the residual stream, and a log-softmax passes an
# absolute logit error through at most doubled. So 4·sqrt(256)·u per block, 2 blocks:
# 7.6e-6; observed ~5e-7.
TOLERANCE = 4 * math.sqrt(256) * 2.0 ** -24 * 2


@contextlib.contextmanager
def engine(folder, env: dict | None = None, **options):
    """``vllm.LLM`` of the model in ``folder`` (fp32, eager, max_model_len 128, LoRA rank <= 8,
    ``options``) with only the kronops plugin, a 1 GiB KV cache, no hub access and ``env``
    set while it runs; the environment is restored after."""
    env = dict(VLLM_PLUGINS="kronops", VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1",
               **(env or {}))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    llm = vllm.LLM(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=128,
                   enable_lora=True, max_lora_rank=8, seed=0, **options)
    try:
        yield llm
    finally:
        del llm
        gc.collect()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def generate_greedy(llm, requests, prompts):
    """One greedy completion of ``MAX_TOKENS`` tokens per prompt, with their logprobs."""
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
    for every kind of ``KRONOPS`` and "lora"; ids 1, 2, ... in that order."""
    _, files, (lora, factors) = assets
    scale = LORA["lora_alpha"] / LORA["r"]
    lokr, lokr_deltas = more_assets["peft_lokr"]
    kinds = {k: (files[k], files[k], None) for k in ADAPTERS}
    kinds.update(krona_dir=(more_assets["krona_dir"], files["krona"], None),
                 peft_lokr=(lokr, None, lokr_deltas),
                 lora=(lora, None, {n: scale * b @ a for n, (a, b) in factors.items()}))
    order = KRONOPS + ["lora"]
    return {k: (LoRARequest(k, order.index(k) + 1, kinds[k][0]),
                *kinds[k][1:]) for k in order}
