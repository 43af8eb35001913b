"""KronA, KronA^B_res and S²FT on T5 (the KronA paper's model) for a small generated seq2seq
task: a tiny T5 is first trained to copy digit strings (the "pretrained" base), then each
method adapts the frozen base to reverse them; full fine-tuning is the reference.

    python examples/finetune_t5.py --json results.json   # about two minutes on 2 CPU cores
    python examples/finetune_t5.py --tiny                 # seconds (CI runs this size)

Nothing is downloaded: the model is transformers' T5ForConditionalGeneration built from a
config, the data generated from a fixed seed. Reported per method: trainable parameters,
exact-match accuracy of greedy decoding on held-out strings before and after, time per
step, and whether the saved adapter reloads into a fresh base with identical outputs.
"""
import argparse
import copy
import json
import os
import tempfile
import time

import torch
import transformers

import kronops

PAD, EOS, FIRST_DIGIT = 0, 1, 2  # token ids: digits d are FIRST_DIGIT + d
METHODS = {"full": None, "krona": dict(rank=4, alpha=8),
           "krona_block_res": dict(rank=4, alpha=8, residual=True),
           "s2ft": dict(ratio=0.25, seed=0)}


def make_batch(n: int, length: int, task: str, generator: torch.Generator) -> dict:
    """``n`` random digit strings of ``length`` and their targets: the same string ("copy")
    or reversed ("reverse"), each ending in EOS."""
    digits = torch.randint(0, 10, (n, length), generator=generator) + FIRST_DIGIT
    target = digits if task == "copy" else digits.flip(1)
    eos = torch.full((n, 1), EOS)
    return dict(input_ids=torch.cat([digits, eos], 1), labels=torch.cat([target, eos], 1))


def tiny_t5() -> transformers.T5ForConditionalGeneration:
    config = transformers.T5Config(vocab_size=FIRST_DIGIT + 10, d_model=64, d_kv=16, d_ff=128,
                                   num_layers=2, num_decoder_layers=2, num_heads=4,
                                   dropout_rate=0.0, decoder_start_token_id=PAD,
                                   pad_token_id=PAD, eos_token_id=EOS)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config)


def train(model, task: str, steps: int, lr: float, length: int, seed: int,
          optimizer=None) -> float:
    """``steps`` AdamW steps on fresh batches of 64; returns ms per step."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer or torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(**make_batch(64, length, task, generator)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return 1e3 * (time.perf_counter() - start) / max(steps, 1)


@torch.no_grad()
def accuracy(model, task: str, length: int) -> float:
    """Exact match of greedy decoding on 256 held-out strings (a seed training never uses)."""
    batch = make_batch(256, length, task, torch.Generator().manual_seed(10_000))
    model.eval()
    out = model.generate(input_ids=batch["input_ids"], max_new_tokens=length + 1,
                         do_sample=False)[:, 1:]
    return (out == batch["labels"]).all(1).float().mean().item()


def run(steps: int, base_steps: int, length: int) -> dict:
    base = tiny_t5()
    train(base, "copy", base_steps, 3e-3, length, seed=1)
    results = dict(base=dict(copy_accuracy=accuracy(base, "copy", length),
                             reverse_accuracy=accuracy(base, "reverse", length)))
    for method, config in METHODS.items():
        model = copy.deepcopy(base)
        if config is not None:
            name = "krona_block" if method == "krona_block_res" else method
            kronops.apply_adapters(model, name, **config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        before = accuracy(model, "reverse", length)
        ms = train(model, "reverse", steps, 3e-3 if config is not None else 1e-3, length,
                   seed=2)
        result = dict(trainable=trainable, before=before,
                      after=accuracy(model, "reverse", length), ms_per_step=ms)
        if config is not None:
            result["reload_identical"] = reload_identical(model, base, length)
        results[method] = result
        print(f"{method:16s} trainable {trainable:7d}  reverse accuracy {before:.3f} -> "
              f"{result['after']:.3f}  {ms:6.1f} ms/step", flush=True)
    return results


@torch.no_grad()
def reload_identical(model, base, length: int) -> bool:
    """Save the adapter, load it into a copy of the base: the same logits?"""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        kronops.save_adapters(model, path)
        fresh = kronops.load_adapters(copy.deepcopy(base), path).eval()
    batch = make_batch(8, length, "reverse", torch.Generator().manual_seed(3))
    model.eval()
    return torch.equal(model(**batch).logits, fresh(**batch).logits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per method")
    parser.add_argument("--base-steps", type=int, default=400, help="steps of copy training")
    parser.add_argument("--length", type=int, default=6, help="digits per string")
    parser.add_argument("--tiny", action="store_true", help="a few steps (CI)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    steps, base_steps = (3, 3) if args.tiny else (args.steps, args.base_steps)
    results = run(steps, base_steps, args.length)
    results["settings"] = dict(steps=steps, base_steps=base_steps, length=args.length,
                               torch=torch.__version__, transformers=transformers.__version__,
                               kronops=kronops.__version__)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
