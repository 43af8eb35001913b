"""Serving kronops adapters in vLLM: one base model, four adapters of four kinds, one mixed
batch offline with ``vllm.LLM``, then one request through vLLM's OpenAI-compatible server.

The adapters: KronA (``kronops.save_adapters`` file), S²FT (the same), LoKr (a PEFT LoKr
folder) and LoRA (a PEFT LoRA folder, vLLM's own kind). The batch mixes them with rows of the
plain model. Every row's tokens are printed and checked against transformers with that
adapter loaded (kronops' ``load_adapters`` for kronops files, PEFT's ``PeftModel`` for PEFT
folders): the same greedy tokens, and logprobs within fp32 rounding. Then the server
(``python -m vllm.entrypoints.openai.api_server``, on 127.0.0.1 at a free port, every adapter
given with ``--lora-modules``) answers one completion request naming the KronA adapter, and
its tokens must be the offline row's.

    .venv-vllm/bin/python examples/serve_vllm.py   # about 2 minutes on 2 CPU cores

Runs in the vLLM environment (README, "Serving in vLLM"; peft installed there too). Nothing is
downloaded: a tiny LLaMA built from a config with random weights, a word-level tokenizer made
from a word list, adapters with random "trained" values. vLLM starts its workers by spawning
processes that import this file again, hence the ``__main__`` guard.
"""
import copy
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import torch

import kronops

WORDS = ("the a one two three quick brown lazy fox dog cat jumps runs over under and serves "
         "adapter kron sparse model batch base rows tokens fast exact small large").split()
VOCAB = 64  # the tokenizer's words, then filler words up to the model's vocabulary
PROMPTS = ["the quick brown fox", "one two three", "the lazy dog jumps over", "a small model",
           "kron sparse adapter", "the cat runs under the", "serves rows fast"]
KINDS = [None, "krona", "s2ft", "lokr", "lora", None, "krona"]  # one per prompt; None: plain
NEW_TOKENS = 8
SERVER_PROMPT = 1  # the row whose prompt and adapter the server is asked
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# fp32 rounding, as tests/vllm_serving derives it: dot products of length k <= 256 round
# with a typical error of sqrt(k)·u of their terms (u = 2^-24), 4x that per block, 2 blocks,
# at most doubled by the log-softmax.
TOLERANCE = 4 * math.sqrt(256) * 2.0 ** -24 * 2


def save_base(folder: str) -> None:
    """A 2-block LLaMA (hidden 128, FFN 256, 4 query heads on 2 K/V heads, fp32) and a
    word-level tokenizer of ``VOCAB`` words, saved in ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = ["<unk>", "<s>", "</s>", *WORDS]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)).save_pretrained(folder)


def set_trained_values(model, seed: int, scale: float = 0.05):
    """Give every trainable parameter of ``model`` random values of size ``scale``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def save_adapters(base, folder: str) -> dict[str, str]:
    """{kind: path}: a KronA and an S²FT file (kronops), a LoKr and a LoRA folder (PEFT)."""
    import peft
    paths = {kind: os.path.join(folder, kind) for kind in ("krona", "s2ft", "lokr", "lora")}
    krona = kronops.apply_adapters(copy.deepcopy(base), "krona")
    s2ft = kronops.apply_adapters(copy.deepcopy(base), "s2ft", mode="adapter")
    for seed, (kind, model) in enumerate((("krona", krona), ("s2ft", s2ft))):
        paths[kind] += ".safetensors"
        kronops.save_adapters(set_trained_values(model, seed), paths[kind])
    configs = {"lokr": peft.LoKrConfig(r=4, alpha=8, target_modules=TARGETS),
               "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)}
    for seed, (kind, config) in enumerate(configs.items(), start=2):
        model = peft.get_peft_model(copy.deepcopy(base), config)
        set_trained_values(model, seed).save_pretrained(paths[kind])
    return paths


def adapted(base, path: str | None):
    """``base`` with the adapter at ``path`` loaded the ordinary way (None: ``base``)."""
    if path is None:
        return base
    if os.path.isdir(path):
        import peft
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    return kronops.load_adapters(copy.deepcopy(base), path).eval()


def check(base, path, prompt_ids, tokens, logprobs) -> float:
    """The largest |Δlogprob| of the served ``tokens`` against transformers; AssertionError
    when a token is not the reference's greedy choice or a logprob is off by more than
    ``TOLERANCE``."""
    ids = torch.tensor([list(prompt_ids) + list(tokens)])
    with torch.no_grad():
        lp = torch.log_softmax(adapted(base, path)(ids).logits[0].float(), -1)
    worst = 0.0
    for j, (token, served) in enumerate(zip(tokens, logprobs)):
        row = lp[len(prompt_ids) + j - 1]
        assert row[token] >= row.max() - TOLERANCE, f"token {j}: {token} is not greedy"
        worst = max(worst, abs(served - float(row[token])))
    assert worst <= TOLERANCE, f"max |Δlogprob| {worst:.3g} > {TOLERANCE:.3g}"
    return worst


def offline(folder: str, paths: dict[str, str]):
    """The mixed batch through ``vllm.LLM``: its outputs, one per prompt."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    requests = {kind: LoRARequest(kind, i + 1, path) for i, (kind, path) in enumerate(paths.items())}
    llm = LLM(model=folder, dtype="float32", enforce_eager=True, max_model_len=128, seed=0,
              enable_lora=True, max_loras=len(paths), max_lora_rank=8)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, logprobs=0, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, lora_request=[requests.get(k) for k in KINDS],
                           use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()  # its engine process ends before the server's starts
    return outputs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_tokens(folder: str, paths: dict[str, str], kind: str, prompt: str) -> list[int]:
    """Start vLLM's OpenAI server with every adapter, ask it for ``prompt`` through adapter
    ``kind`` (greedy, ``NEW_TOKENS`` tokens) and stop it; the generated token ids."""
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
               "--enforce-eager", "--max-model-len", "128", "--enable-lora",
               "--max-loras", str(len(paths)), "--max-lora-rank", "8", "--lora-modules",
               *(f"{k}={p}" for k, p in paths.items())]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited ({server.returncode}):\n"
                                   f"{server.stderr.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5):
                    break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(2)
        body = dict(model=kind, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0,
                    ignore_eos=True, return_token_ids=True)
        request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            return json.load(response)["choices"][0]["token_ids"]
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    from transformers import AutoModelForCausalLM
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    folder = tempfile.mkdtemp(prefix="kronops-serve-vllm-")
    model_dir = os.path.join(folder, "base")
    save_base(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    paths = save_adapters(base, folder)
    start = time.time()
    outputs = offline(model_dir, paths)
    print(f"offline: one batch of {len(PROMPTS)} rows ({time.time() - start:.0f} s with the "
          "engine's start)")
    for prompt, kind, out in zip(PROMPTS, KINDS, outputs):
        tokens = list(out.outputs[0].token_ids)
        logprobs = [step[t].logprob for step, t in zip(out.outputs[0].logprobs, tokens)]
        worst = check(base, paths.get(kind), out.prompt_token_ids, tokens, logprobs)
        print(f"  {kind or 'plain':6} {prompt!r:28} -> {tokens}  "
              f"max |Δlogprob| vs transformers {worst:.1e}")
    kind, prompt = KINDS[SERVER_PROMPT], PROMPTS[SERVER_PROMPT]
    start = time.time()
    served = server_tokens(model_dir, paths, kind, prompt)
    print(f"server: {kind} {prompt!r} -> {served} ({time.time() - start:.0f} s with the start)")
    expected = list(outputs[SERVER_PROMPT].outputs[0].token_ids)
    assert served == expected, f"the server gave {served}, the offline batch {expected}"
    print("every row matches transformers; the server matches the offline batch")


if __name__ == "__main__":
    main()
