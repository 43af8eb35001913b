"""One base model serving four fine-tuned adapters (two KronA, two S²FT) in one generate()
batch, with ``kronops.serving.AdapterBank``.

A tiny LLaMA-style model learns digit sequences that go up by one (the "pretrained" base);
four adapters each teach it another rule for the next digit (down by one, up by three,
times three, repeat), two with KronA and two with S²FT (adapter and in-place modes), and
each is saved as an adapter file. The bank loads the four files over the one base model
and decodes a batch whose rows use different adapters (and the base) in one generate()
call. Each row is checked against that adapter's merged model (``bank.merge``): the
tokens must be identical.

    python examples/serve_adapters.py --json results.json   # about 20 s on 2 CPU cores
    python examples/serve_adapters.py --tiny                 # seconds (CI runs this size)

Nothing is downloaded: transformers' LlamaForCausalLM from a config, data from fixed seeds.
The model runs in fp64 so that greedy decoding cannot flip on a rounding-level tie between
the two ways of computing the same adapted model. Two runs of the same command on the same
machine give the same results (``reproducible``: seeds, deterministic algorithms, a fixed
thread count); only the generate() time differs.
"""
import argparse
import copy
import os
import tempfile
import time

import torch
import transformers

import kronops
import reproducible
from kronops.serving import AdapterBank

FIRST_DIGIT = 1  # token ids: digit d is FIRST_DIGIT + d; 0 pads
RULES = {"up": lambda d: (d + 1) % 10, "down": lambda d: (d - 1) % 10,
         "up3": lambda d: (d + 3) % 10, "times3": lambda d: (3 * d) % 10,
         "repeat": lambda d: d}
BASE_RULE = "up"
# adapter name -> (rule, method, apply_adapters options, optimizer)
ADAPTERS = {
    "down (KronA)": ("down", "krona", dict(rank=4, alpha=8), "adamw"),
    "up3 (KronA)": ("up3", "krona", dict(), "adamw"),
    "times3 (S²FT)": ("times3", "s2ft", dict(ratio=0.5, mode="adapter"), "adamw"),
    "repeat (S²FT in place)": ("repeat", "s2ft", dict(ratio=0.5, mode="inplace"), "inplace"),
}


def sequences(rule: str, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` digit sequences of ``length`` following ``rule`` from random first digits."""
    digits = [torch.randint(0, 10, (n,), generator=generator)]
    for _ in range(length - 1):
        digits.append(RULES[rule](digits[-1]))
    return torch.stack(digits, 1) + FIRST_DIGIT


def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=FIRST_DIGIT + 10, hidden_size=64,
                                      intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0,
                                      bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).double()


def train(model, rule: str, steps: int, lr: float, seed: int, inplace: bool = False) -> float:
    """Next-token training on sequences of ``rule`` (AdamW, or kronops' in-place AdamW);
    returns the last loss."""
    model.train()
    g = torch.Generator().manual_seed(seed)
    optimizer = kronops.InPlaceAdamW(model, lr=lr) if inplace else torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        ids = sequences(rule, 32, 8, g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def accuracy(generated: torch.Tensor, prompt_length: int, rule: str) -> float:
    """Share of generated digits that follow ``rule`` from the digit before them."""
    digits = generated - FIRST_DIGIT
    new = digits[:, prompt_length:]
    before = digits[:, prompt_length - 1:-1]
    return (new == RULES[rule](before)).double().mean().item()


def run(base_steps: int, steps: int, folder: str) -> tuple:
    """Train the base and the four adapters, serve them in one batch: (results, timing),
    the timing (the mixed batch's generate() seconds) apart because it differs between runs."""
    base = tiny_llama()
    losses = {"base": train(base, BASE_RULE, base_steps, 3e-3, seed=0)}
    files = {}
    for seed, (name, (rule, method, options, optimizer)) in enumerate(ADAPTERS.items(), 1):
        torch.manual_seed(seed)  # the adapter's initial values depend on this seed alone
        model = kronops.apply_adapters(copy.deepcopy(base), method, **options)
        losses[name] = train(model, rule, steps, 1e-2, seed, inplace=optimizer == "inplace")
        files[name] = os.path.join(folder, f"adapter{seed}.safetensors")
        kronops.save_adapters(model, files[name])

    bank = AdapterBank(base)
    for name, path in files.items():
        bank.load(name, path)
    route = [name for name in ADAPTERS for _ in range(2)] + [None, None]
    prompts = sequences(BASE_RULE, len(route), 3, torch.Generator().manual_seed(99))
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    start = time.perf_counter()
    with bank.route(route):
        mixed = base.generate(prompts, attention_mask=torch.ones_like(prompts), **settings)
    seconds = time.perf_counter() - start

    results = {"rows": len(route), "adapters": {}}
    for name in [*ADAPTERS, None]:
        rows = [r for r, n in enumerate(route) if n == name]
        rule = BASE_RULE if name is None else ADAPTERS[name][0]
        if name is not None:
            bank.merge(name)
        elif bank.merged:
            bank.unmerge()
        merged = base.generate(prompts[rows], attention_mask=torch.ones_like(prompts[rows]),
                               **settings)
        results["adapters"][name or "base"] = dict(
            rule=rule, bytes=bank.nbytes(name) if name else 0, loss=losses[name or "base"],
            accuracy=accuracy(mixed[rows], prompts.shape[1], rule),
            identical_to_merged=torch.equal(mixed[rows], merged))
    return results, dict(generate_s=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-steps", type=int, default=300, help="steps of base training")
    parser.add_argument("--steps", type=int, default=150, help="training steps per adapter")
    parser.add_argument("--tiny", action="store_true", help="a few steps (CI)")
    parser.add_argument("--json", help="write the results to this file")
    reproducible.add_threads_option(parser)
    args = parser.parse_args()
    reproducible.setup(args.threads)
    base_steps, steps = (3, 3) if args.tiny else (args.base_steps, args.steps)
    with tempfile.TemporaryDirectory() as folder:
        results, timing = run(base_steps, steps, folder)
    print(f"{results['rows']} rows, one generate() call: {timing['generate_s'] * 1e3:.0f} ms")
    print(f"{'adapter':<24} {'rule':<7} {'KiB':>6} {'accuracy':>9}  identical to merged")
    for name, r in results["adapters"].items():
        print(f"{name:<24} {r['rule']:<7} {r['bytes'] / 1024:>6.1f} {r['accuracy']:>9.2f}  "
              f"{r['identical_to_merged']}")
    if args.json:
        reproducible.write_json(args.json, dict(base_steps=base_steps, steps=steps, **results),
                                timing)


if __name__ == "__main__":
    main()
