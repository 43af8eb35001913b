"""KronA, KronA^B_res and S²FT on T5 (the KronA paper's model) for a small generated seq2seq
task: a tiny T5 is first trained to copy digit strings (the "pretrained" base), then each
method adapts the frozen base to reverse them; full fine-tuning is the reference.

    python examples/finetune_t5.py --json results.json   # about 40 s on 2 CPU cores
    python examples/finetune_t5.py --tiny                 # seconds (CI runs this size)

Nothing is downloaded: the model is transformers' T5ForConditionalGeneration built from a
config, the data generated from fixed seeds. Reported per method: trainable parameters,
exact-match accuracy of greedy decoding on held-out strings before and after, the last
training loss, time per step, and whether the saved adapter reloads into a fresh base with
identical outputs. Two runs of the same command on the same machine give the same results
(``reproducible``: seeds, deterministic algorithms, a fixed thread count); only the timings
differ.
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
import reproducible

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


def train(model, task: str, steps: int, lr: float, length: int, seed: int) -> tuple:
    """``steps`` AdamW steps on fresh batches of 64; returns (last loss, ms per step)."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(**make_batch(64, length, task, generator)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item(), 1e3 * (time.perf_counter() - start) / steps


@torch.no_grad()
def accuracy(model, task: str, length: int, n: int) -> float:
    """Exact match of greedy decoding on ``n`` held-out strings (a seed training never uses)."""
    batch = make_batch(n, length, task, torch.Generator().manual_seed(10_000))
    model.eval()
    out = model.generate(input_ids=batch["input_ids"], max_new_tokens=length + 1,
                         do_sample=False)[:, 1:]
    return (out == batch["labels"]).all(1).float().mean().item()


def run(steps: int, base_steps: int, length: int, eval_strings: int = 256) -> tuple:
    """Train the copy base, then every method on reversal: (results, timing), the timing
    (ms per step) apart because it is the one part that differs between runs."""
    base = tiny_t5()
    base_loss, base_ms = train(base, "copy", base_steps, 3e-3, length, seed=1)
    results = dict(base=dict(loss=base_loss,
                             copy_accuracy=accuracy(base, "copy", length, eval_strings),
                             reverse_accuracy=accuracy(base, "reverse", length, eval_strings)))
    timing = dict(base=base_ms)
    for method, config in METHODS.items():
        model = copy.deepcopy(base)
        if config is not None:
            name = "krona_block" if method == "krona_block_res" else method
            torch.manual_seed(0)  # the adapter's initial values depend on this seed alone
            kronops.apply_adapters(model, name, **config)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        before = accuracy(model, "reverse", length, eval_strings)
        loss, timing[method] = train(model, "reverse", steps,
                                     3e-3 if config is not None else 1e-3, length, seed=2)
        result = dict(trainable=trainable, before=before, loss=loss,
                      after=accuracy(model, "reverse", length, eval_strings))
        if config is not None:
            result["reload_identical"] = reload_identical(model, base, length)
        results[method] = result
        print(f"{method:16s} trainable {trainable:7d}  reverse accuracy {before:.3f} -> "
              f"{result['after']:.3f}  loss {loss:.4f}  {timing[method]:6.1f} ms/step",
              flush=True)
    return results, timing


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
    parser.add_argument("--tiny", action="store_true", help="a few steps, 32 test strings (CI)")
    parser.add_argument("--json", help="write the results to this file")
    reproducible.add_threads_option(parser)
    args = parser.parse_args()
    reproducible.setup(args.threads)
    settings = dict(steps=args.steps, base_steps=args.base_steps, length=args.length,
                    eval_strings=256)
    if args.tiny:
        settings.update(steps=3, base_steps=3, eval_strings=32)
    results, timing = run(**settings)
    if args.json:
        reproducible.write_json(args.json, dict(settings=settings, **results),
                                dict(ms_per_step=timing))


if __name__ == "__main__":
    main()
