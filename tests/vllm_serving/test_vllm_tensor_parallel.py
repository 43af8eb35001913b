"""kronops adapters served at tensor_parallel_size 2 on vLLM's CPU build (two worker
processes, one core each): a mixed batch of plain, KronA, S²FT (rows of q/k/v and gate/up,
columns of o_proj and down_proj), PEFT LoKr and PEFT LoRA rows equals transformers with each
adapter alone, so every rank's cut of the factors and selections adds up to the whole layer.

~2 min (the two-worker engine takes ~100 s to start on 2 shared cores). Needs 2 cores; runs
where vllm is importable (.ci/vllm).
"""
import os

import pytest

vllm = pytest.importorskip(
    "vllm", reason="vllm is not importable here: the vLLM tests run in their own environment "
                   "(.ci/vllm, .venv-vllm)")

from vllm_assets import assets, more_assets  # noqa: E402,F401  (fixtures)
from vllm_engine import (TOLERANCE, engine, generate_greedy, max_error,  # noqa: E402,F401
                         served)

KINDS = [None, "krona", "s2ft", "peft_lokr", "lora"]
PROMPTS = ["the quick brown fox", "hello world kron adapter", "the lazy dog 12",
           "over the lazy dog 7", "the brown dog jumps 5"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="tensor parallelism on vLLM's "
                    "CPU build binds each of the 2 workers to its own core")
def test_a_mixed_batch_at_tensor_parallel_size_2(assets, served):
    # vLLM's CPU build binds each worker's threads to a NUMA node unless told which cores
    with engine(assets[0], dict(VLLM_CPU_OMP_THREADS_BIND="0|1"), max_loras=len(KINDS),
                tensor_parallel_size=2, distributed_executor_backend="mp") as llm:
        out = generate_greedy(llm, [None if k is None else served[k][0] for k in KINDS],
                              PROMPTS)
    for row, kind in zip(out, KINDS):
        error = max_error(row, assets[0], *(served[kind][1:] if kind else (None, None)))
        assert error <= TOLERANCE, f"{kind}: max |Δlogprob| {error:.3g}"
