"""Continual fine-tuning with EWC (plain, diagonal, Kronecker-factored) and curvature-weighted
merging (mean, diag, input, kron) with ``kronops.curvature``, on a small BERT and three
generated token-sequence tasks; full fine-tuning and S²FT.

    python examples/continual_curvature.py --json results.json   # about 13 min on 2 busy CPU cores
    python examples/continual_curvature.py --tiny                 # seconds (CI runs this size)

Nothing is downloaded: the model is transformers' BertModel built from a config (2 layers,
hidden 64, 4 heads, FFN 128) with masked mean pooling and a linear head (``Classifier`` of
finetune_minilm.py), randomly initialised from a fixed seed. The packaged MiniLM would take
too long for 3 tasks x 6 methods plus merging on 2 CPU cores.

Tasks: sequences [CLS, task token, 15 content tokens]; one shared 2-way head, so a task is
told only by its task token. "majority": more content tokens from the lower half of the
content vocabulary than the upper; "order": the first content token is smaller than the
last; "contains": one of three marker tokens appears. The tasks share the same inputs'
statistics and the same head, so learning one moves what the others need: plain fine-tuning
forgets.

Part 1 (continual): the tasks in that order; after each, accuracy on every task seen so far.
EWC: after task k, ``collect`` the factors (and the diagonal Fisher) on task k's data and
keep the model as the anchor; later tasks add ``ewc_penalty(model, factors_k, anchor_k,
strength=λ, kind=...)`` for every earlier k. The factors use ``approx="reduce"`` (in the
merging part too): the loss has one term per sequence, after mean pooling, and with the
default "expand" the encoder's factors are 1/17 to 1/17² (17 positions) of its
per-sequence Fisher while the head's are not, so EWC held the head and let the encoder
drift (the earlier tasks ended at their majority class at λ 100 and 1000; λ 1e4 also
stopped the later tasks being learnt). "full" trains every Linear (weights, biases, head);
embeddings and LayerNorms stay frozen so that every trained parameter is one the
curvature covers. "s2ft" trains 1 of 4 heads and 32 of 128 FFN channels per block in place
(``apply_adapters(model, "s2ft", mode="inplace")`` + ``InPlaceAdamW``) and the head
(AdamW); adapter mode would do the same (``ewc_penalty`` anchors it at the anchor's Δ).

Part 2 (merging): from the same base, one model per task (full, and S²FT in adapter mode:
``merge_models`` merges adapter-mode Δs, not in-place layers), each merged with
``merge_models(kind=...)`` and scored on every task.

Two runs of the same command on the same machine give the same results (``reproducible``:
seeds per method, deterministic algorithms, a fixed thread count); only timings differ.
"""
import argparse
import copy
import time

import torch
import transformers
from torch import nn

import kronops
import reproducible
from finetune_minilm import Classifier
from kronops.curvature import collect, ewc_penalty, merge_models

CLS, FIRST_TASK = 1, 2
TASKS = ("majority", "order", "contains")
FIRST_CONTENT, CONTENT = FIRST_TASK + len(TASKS), 48  # content tokens FIRST_CONTENT + 0..47
LENGTH = 15  # content tokens per sequence (odd: "majority" has no ties)
MARKERS = torch.tensor([0, 1, 2]) + FIRST_CONTENT  # "contains" looks for these
METHODS = ("plain", "diag", "kron")  # plain fine-tuning, diagonal EWC, K-FAC EWC
SETTINGS = ("full", "s2ft")
MERGE_KINDS = ("mean", "diag", "input", "kron")
# EWC strength λ: 1000 for both methods and both settings. Chosen for K-FAC EWC with full
# fine-tuning from {1e3, 1e4, 1e5} by the final mean accuracy over the three tasks on the
# validation split (1e4 and 1e5 kept the first task but stopped the later ones being learnt;
# 100, in a first run on the test split, changed nothing); diagonal EWC and S²FT take the
# same value, untuned. ``--select 1000,10000`` scores such a grid for every method/setting.
STRENGTH = {"plain": 0.0, "diag": 1000.0, "kron": 1000.0}
MERGE_DAMPING = 1e-3  # γ of merge_models: pulls uncovered directions to the plain mean
LR = {"full": 1e-3, "s2ft": 3e-3}
APPROX = "reduce"  # collect's K-FAC variant: the loss is per sequence, after mean pooling


def make_task(task: str, n: int, generator: torch.Generator) -> dict:
    """``n`` sequences of ``task`` and their labels, a batch dict (input_ids, attention_mask,
    labels); the same generator state always gives the same batch. Labels are balanced:
    "contains" inserts a marker into half the sequences, the others are about 50/50 by
    symmetry."""
    content = torch.randint(0, CONTENT, (n, LENGTH), generator=generator)
    if task == "majority":
        labels = ((content < CONTENT // 2).sum(1) > LENGTH // 2).long()
    elif task == "order":
        labels = (content[:, 0] < content[:, -1]).long()
    else:
        content = torch.randint(len(MARKERS), CONTENT, (n, LENGTH), generator=generator)
        labels = (torch.rand(n, generator=generator) < 0.5).long()
        where = torch.randint(0, LENGTH, (n,), generator=generator)
        marker = torch.randint(0, len(MARKERS), (n,), generator=generator)
        rows = labels.bool()
        content[rows, where[rows]] = marker[rows]
    head = torch.tensor([CLS, FIRST_TASK + TASKS.index(task)]).expand(n, 2)
    ids = torch.cat([head, content + FIRST_CONTENT], 1)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)


def split(task: str, split_name: str, n: int, seed: int) -> dict:
    """A fixed data set of ``task``: "val" and "test" are drawn from their own seeds."""
    offset = {"val": 1, "test": 2}[split_name]
    return make_task(task, n, torch.Generator().manual_seed(seed * 1000 + 10 * offset
                                                            + TASKS.index(task)))


def small_bert(seed: int) -> Classifier:
    """The base model: a BertModel from a config (no dropout) with a fresh head, from ``seed``."""
    config = transformers.BertConfig(
        vocab_size=FIRST_CONTENT + CONTENT, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, max_position_embeddings=LENGTH + 2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return Classifier(transformers.BertModel(config, add_pooling_layer=False), 64)


def prepare(model: Classifier, setting: str, mode: str, seed: int) -> Classifier:
    """Freeze what ``setting`` does not train: "full": everything but the Linears; "s2ft":
    S²FT (1 head, 32 FFN channels per block, random, from ``seed``) in ``mode``, and the head."""
    if setting == "full":
        for module in model.modules():
            for p in module.parameters(recurse=False):
                p.requires_grad_(isinstance(module, nn.Linear))
        return model
    return kronops.apply_adapters(model, "s2ft", heads=1, channels=32, seed=seed, mode=mode,
                                  train_modules=["head"])


def loss_fn(model, batch) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over the batch and its number of terms (``collect``'s loss_fn)."""
    logits = model(batch["input_ids"], batch["attention_mask"])
    return nn.functional.cross_entropy(logits, batch["labels"]), len(batch["labels"])


@torch.no_grad()
def accuracy(model, data: dict) -> float:
    model.eval()
    logits = model(data["input_ids"], data["attention_mask"])
    return (logits.argmax(1) == data["labels"]).float().mean().item()


def optimizers(model) -> list[torch.optim.Optimizer]:
    """AdamW for the ordinary trainable parameters, plus InPlaceAdamW for in-place S²FT."""
    lr = LR["s2ft" if kronops.adapters.adapter_modules(model) else "full"]
    inplace = any(isinstance(m, kronops.s2ft.S2FTInPlaceLinear) for m in model.modules())
    plain = [p for n, p in model.named_parameters()
             if p.requires_grad and not (inplace and n.endswith(".selected"))]
    opts = [torch.optim.AdamW(plain, lr=lr, weight_decay=0.0)]
    if inplace:
        opts.append(kronops.s2ft.InPlaceAdamW(model, lr=lr, weight_decay=0.0))
    return opts


def train(model, task: str, steps: int, batch_size: int, seed: int, anchors=(),
          kind: str = "kron", strength: float = 0.0) -> float:
    """``steps`` steps on fresh batches of ``task``, plus the EWC penalty of every
    (factors, anchor) in ``anchors``; returns the last task loss."""
    generator = torch.Generator().manual_seed(seed)
    opts = optimizers(model)
    model.train()
    for _ in range(steps):
        loss, _ = loss_fn(model, make_task(task, batch_size, generator))
        total = loss
        for factors, anchor in anchors:
            total = total + ewc_penalty(model, factors, anchor, strength=strength, kind=kind)
        total.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return loss.item()


def curvature(model, task: str, n: int, batch_size: int, seed: int) -> dict:
    """K-FAC factors and the diagonal Fisher of ``model`` on ``n`` examples of ``task``
    (the empirical Fisher: the true labels)."""
    generator = torch.Generator().manual_seed(seed)
    batches = [make_task(task, batch_size, generator) for _ in range(max(1, n // batch_size))]
    return collect(model, batches, loss_fn=loss_fn, diagonal=True, approx=APPROX)


def continual(setting: str, method: str, cfg: dict, eval_split: str, strength=None) -> dict:
    """One method through the three tasks: accuracy on every task seen so far after each."""
    seed = cfg["seed"] + 10 * METHODS.index(method) + 100 * SETTINGS.index(setting)
    reproducible.setup(cfg["threads"], seed)
    model = prepare(small_bert(cfg["seed"]), setting, "inplace", cfg["seed"])
    strength = STRENGTH[method] if strength is None else strength
    data = {t: split(t, eval_split, cfg["n_eval"], cfg["seed"]) for t in TASKS}
    anchors, stages = [], []
    for k, task in enumerate(TASKS):
        loss = train(model, task, cfg["steps"], cfg["batch_size"], seed + k, anchors,
                     kind="diag" if method == "diag" else "kron", strength=strength)
        stages.append(dict(task=task, loss=loss,
                           accuracy={t: accuracy(model, data[t]) for t in TASKS[:k + 1]}))
        if method != "plain" and k + 1 < len(TASKS):
            factors = curvature(model, task, cfg["n_fisher"], cfg["batch_size"], seed + 50 + k)
            anchors.append((factors, copy.deepcopy(model.state_dict())))
    return dict(setting=setting, method=method, strength=strength, stages=stages,
                **forgetting(stages))


def forgetting(stages: list[dict]) -> dict:
    """Forgetting of each earlier task (its accuracy right after it was learnt minus at the
    end), their mean, and the final accuracy averaged over all tasks."""
    final = stages[-1]["accuracy"]
    drops = {s["task"]: s["accuracy"][s["task"]] - final[s["task"]] for s in stages[:-1]}
    return dict(forgetting=drops, mean_forgetting=sum(drops.values()) / len(drops),
                final_mean_accuracy=sum(final.values()) / len(final))


def merging(setting: str, cfg: dict) -> dict:
    """One model per task from the same base, merged by every kind; each scored per task."""
    seed = cfg["seed"] + 1000 + 100 * SETTINGS.index(setting)
    reproducible.setup(cfg["threads"], seed)
    base = prepare(small_bert(cfg["seed"]), setting, "adapter", cfg["seed"])
    test = {t: split(t, "test", cfg["n_eval"], cfg["seed"]) for t in TASKS}
    models, factors, single = [], [], {}
    for k, task in enumerate(TASKS):
        model = copy.deepcopy(base)
        train(model, task, cfg["steps"], cfg["batch_size"], seed + k)
        single[task] = {t: accuracy(model, test[t]) for t in TASKS}
        models.append(model)
        factors.append(curvature(model, task, cfg["n_fisher"], cfg["batch_size"], seed + 50 + k))
    merged = {}
    for kind in MERGE_KINDS:
        state = merge_models(models, None if kind == "mean" else factors, kind=kind,
                             damping=None if kind == "mean" else MERGE_DAMPING)
        model = copy.deepcopy(base)
        model.load_state_dict(state)
        scores = {t: accuracy(model, test[t]) for t in TASKS}
        merged[kind] = dict(accuracy=scores, mean=sum(scores.values()) / len(scores))
    return dict(setting=setting, single=single, merged=merged)


def choose_strengths(cfg: dict, grid) -> dict:
    """Final mean accuracy on the validation split for every (setting, method, λ in grid)."""
    return {f"{s}/{m}/{lam:g}": continual(s, m, cfg, "val", lam)["final_mean_accuracy"]
            for s in SETTINGS for m in METHODS[1:] for lam in grid}


def print_tables(runs: list[dict], merges: list[dict]) -> None:
    for setting in SETTINGS:
        print(f"\n{setting}: accuracy on each task after each stage (test split)")
        print(f"{'method':>6} | {'λ':>6} | " + " | ".join(f"after {t:<8}" for t in TASKS)
              + " | forgetting | final mean")
        for r in (r for r in runs if r["setting"] == setting):
            cells = [" ".join(f"{s['accuracy'][t]:.2f}" for t in TASKS[:i + 1])
                     for i, s in enumerate(r["stages"])]
            print(f"{r['method']:>6} | {r['strength']:>6g} | " +
                  " | ".join(f"{c:<14}" for c in cells) +
                  f" | {r['mean_forgetting']:>10.3f} | {r['final_mean_accuracy']:.3f}")
    for m in merges:
        print(f"\n{m['setting']}: merged models, accuracy per task (test split)")
        rows = [(f"only {t}", m["single"][t]) for t in TASKS]
        rows += [(kind, m["merged"][kind]["accuracy"]) for kind in MERGE_KINDS]
        print(f"{'model':>15} | " + " | ".join(f"{t:>8}" for t in TASKS) + " |  mean")
        for name, acc in rows:
            print(f"{name:>15} | " + " | ".join(f"{acc[t]:>8.3f}" for t in TASKS) +
                  f" | {sum(acc.values()) / len(acc):.3f}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120, help="training steps per task")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--n-eval", type=int, default=500, help="validation/test size per task")
    parser.add_argument("--n-fisher", type=int, default=512,
                        help="examples per task the curvature is collected on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--select", default="", metavar="GRID",
                        help="e.g. 1,10,100,1000: also score these EWC strengths on the "
                             "validation split (λ is still STRENGTH's)")
    parser.add_argument("--tiny", action="store_true", help="2 steps per task, 32 examples")
    parser.add_argument("--json", help="write the results here")
    reproducible.add_threads_option(parser)
    args = parser.parse_args(argv)
    cfg = dict(steps=args.steps, batch_size=args.batch_size, n_eval=args.n_eval,
               n_fisher=args.n_fisher, seed=args.seed, threads=args.threads)
    if args.tiny:
        cfg.update(steps=2, batch_size=16, n_eval=32, n_fisher=16)
    timing, start = {}, time.perf_counter()
    selection = choose_strengths(cfg, [float(x) for x in args.select.split(",")]) \
        if args.select else None
    timing["selection_s"] = time.perf_counter() - start
    runs = []
    for setting in SETTINGS:
        for method in METHODS:
            t0 = time.perf_counter()
            runs.append(continual(setting, method, cfg, "test"))
            timing[f"{setting}/{method}_s"] = time.perf_counter() - t0
    plain = {r["setting"]: r["mean_forgetting"] for r in runs if r["method"] == "plain"}
    for r in runs:  # 1 - forgetting / plain forgetting, as the paper's "reduction"
        p = plain[r["setting"]]
        r["forgetting_reduction"] = 1 - r["mean_forgetting"] / p if p > 0 else None
    merges = []
    for setting in SETTINGS:
        t0 = time.perf_counter()
        merges.append(merging(setting, cfg))
        timing[f"merge/{setting}_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - start
    print_tables(runs, merges)
    for r in runs:
        if r["forgetting_reduction"] is not None and r["method"] != "plain":
            print(f"{r['setting']}/{r['method']}: forgetting reduced by "
                  f"{100 * r['forgetting_reduction']:.0f}% against plain fine-tuning")
    if selection:
        print("validation final mean accuracy per strength: " +
              ", ".join(f"{k} {v:.3f}" for k, v in selection.items()))
    results = dict(config=cfg, strength=STRENGTH, merge_damping=MERGE_DAMPING, lr=LR,
                   continual=runs, merging=merges, selection=selection)
    if args.json:
        reproducible.write_json(args.json, results, timing, packages=("torch", "transformers"))
    return results


if __name__ == "__main__":
    main()
