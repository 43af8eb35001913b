"""Serving many adapters on one LLaMA-style base model (``kronops.serving.AdapterBank``).

"AdapterBank" rows: one forward pass of a mixed batch whose rows use n different adapters
(KronA and S²FT alternating), against the same batch through the base model alone (the
floor), and against the naive way: merge each adapter in turn and run its rows as a
sub-batch. A KronA-only batch adds PEFT LoKr: its ``adapter_names=`` mixed batch, and one
sub-batch per adapter with ``set_adapter``. Every checked provider is compared with fp64:
each row through its adapter loaded the ordinary way (``load_adapters``). The shape names
the bytes one adapter takes in the bank. "AdapterBank switch" rows time one switch (merge
an adapter, taking the previous one out) against loading a file into an adapted model and
merging it, and against copying the base weights (what a switch by weight copy costs).
"""
import copy
import os
import tempfile

import torch

import kronops
from kronops.adapters import select
from kronops.serving import AdapterBank

from .cases import INPUT_SETS, Case, element_bytes
from .optional import load_peft, load_transformers
from .peft_providers import peft_version

FRACTION = 0.05  # S²FT adapters train 5% of the heads and FFN channels


def _trained(base, method: str, seed: int):
    """A copy of ``base`` with one adapter of ``method`` holding small random trained values."""
    model = copy.deepcopy(base)
    if method == "s2ft":
        plan = select(model, heads=FRACTION, channels=FRACTION, seed=seed)
        kronops.apply_adapters(model, "s2ft", plan=plan, mode="adapter")
    else:
        kronops.apply_adapters(model, "krona")
    return randomized(model, seed)


def randomized(model, seed: int):
    """``model`` with every trainable parameter set to small random "trained" values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.02 * torch.randn(p.shape, generator=g).to(p))
    return model


def adapter_files(base, methods: list[str], folder: str) -> dict[str, str]:
    """{adapter name: file} for adapters of ``methods`` over ``base``."""
    files = {}
    for seed, method in enumerate(methods):
        files[f"{method}{seed}"] = os.path.join(folder, f"{method}{seed}.safetensors")
        kronops.save_adapters(_trained(base, method, seed), files[f"{method}{seed}"])
    return files


def _rows_of(route: list[str]) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([r for r, n in enumerate(route) if n == name])
            for name in dict.fromkeys(route)}


def _per_adapter(route, forward):
    """A provider running each adapter's rows as one sub-batch: ``forward(name, ids)``."""
    rows_of = _rows_of(route)

    def run(ids):
        out = None
        for name, rows in rows_of.items():
            part = forward(name, ids[rows.to(ids.device)])
            out = part.new_empty((ids.shape[0], *part.shape[1:])) if out is None else out
            out[rows.to(ids.device)] = part
        return out
    return run


def _reference(base, files, route, batches):
    """fp64 logits of batch 0, each row through its adapter loaded with ``load_adapters``
    (on the base model's device)."""
    base64 = copy.deepcopy(base).to(torch.float64)

    def forward(name, ids):
        model = kronops.load_adapters(copy.deepcopy(base64), files[name]).eval()
        return model(ids).logits

    def reference():
        with torch.no_grad():
            return _per_adapter(route, forward)(batches[0])
    return reference


def _peft_lokr(base, files: dict[str, str]):
    """A PEFT LoKr model holding the KronA ``files`` as adapters of the same names."""
    from kronops.adapters.peft import to_peft_state_dict

    peft, _ = load_peft()

    model = None
    for name, path in files.items():
        adapted = kronops.load_adapters(copy.deepcopy(base), path)
        tensors, config = to_peft_state_dict(adapted)
        if model is None:
            model = peft.get_peft_model(copy.deepcopy(base), peft.LoKrConfig(**config),
                                        adapter_name=name)
        else:
            model.add_adapter(name, peft.LoKrConfig(**config))
        peft.set_peft_model_state_dict(model, tensors, adapter_name=name)
    return model.eval()


def _bank_nbytes(bank: AdapterBank, method: str) -> str:
    sizes = [bank.nbytes(n) for n in bank.names if n.startswith(method)]
    return f"{sum(sizes) / len(sizes) / 2 ** 20:.2f} MiB" if sizes else "-"


def serving_cases(config: dict, rows: int, seq: int, counts, dtype, device):
    """Mixed batches of ``rows`` x ``seq`` tokens with n adapters for n in ``counts``, a
    KronA-only batch with PEFT beside it, and the switch rows, on a LlamaForCausalLM built
    from ``config``."""
    transformers, _ = load_transformers()
    if transformers is None:
        return []
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(device=device, dtype=dtype).eval()
    folder = tempfile.mkdtemp(prefix="kronops-bench-serving-")
    most = max(*counts, 4)  # the switch rows alternate between two adapters of each method
    files = adapter_files(base, [("krona", "s2ft")[i % 2] for i in range(most)], folder)
    bank = AdapterBank(base)
    for name, path in files.items():
        bank.load(name, path)
    batches = [torch.randint(0, config["vocab_size"], (rows, seq), device=device)
               for _ in range(INPUT_SETS)]
    memory = f"per adapter {_bank_nbytes(bank, 'krona')} KronA, {_bank_nbytes(bank, 's2ft')} S²FT"
    params = sum(p.numel() for p in base.parameters())

    def forward(ids):
        with torch.no_grad():
            return base(ids).logits

    def merged(name, ids):
        bank.merge(name)
        return forward(ids)

    def mixed_case(route, shape, extra=None):
        def bank_run(i):
            with bank.route(route):
                return forward(batches[i])

        def naive_run(i):
            out = _per_adapter(route, merged)(batches[i])
            bank.unmerge()
            return out
        providers = {"kronops AdapterBank (one mixed batch)": bank_run,
                     **(extra or {}),
                     "naive: merge each adapter, run its rows (bank.merge)": naive_run,
                     "base model alone (no adapters, floor)": lambda i: forward(batches[i])}
        return Case("AdapterBank", "mixed batch", shape, rows * seq,
                    params * element_bytes(dtype), 2 * params * rows * seq, providers,
                    _reference(base, files, route, batches),
                    {"base model alone (no adapters, floor)"})

    cases = []
    for n in counts:
        names = list(files)[:n]
        route = [names[r % n] for r in range(rows)]
        cases.append(mixed_case(route, f"{n} adapters (KronA, S²FT {FRACTION:.0%} alternating), "
                                       f"{rows}x{seq} tokens; {memory}"))
    if peft_version() is not None:
        kron_names = [n for n in files if n.startswith("krona")][:16]
        route = [kron_names[r % len(kron_names)] for r in range(rows)]
        lokr = _peft_lokr(base, {n: files[n] for n in kron_names})

        def peft_mixed(i):
            with torch.no_grad():
                return lokr(batches[i], adapter_names=route).logits

        def peft_sub(name, ids):
            lokr.set_adapter(name)
            with torch.no_grad():
                return lokr(ids).logits
        extra = {f"PEFT {peft_version()} LoKr adapter_names= (one batch)": peft_mixed,
                 f"PEFT {peft_version()} LoKr, one sub-batch per adapter (set_adapter)":
                     lambda i: _per_adapter(route, peft_sub)(batches[i])}
        cases.append(mixed_case(route, f"{len(kron_names)} KronA adapters, {rows}x{seq} tokens",
                                extra))
    cases.append(_switch_case(base, bank, files, dtype, memory))
    return cases


def _switch_case(base, bank: AdapterBank, files: dict, dtype, memory: str) -> Case:
    """One switch: bank.merge of another adapter (the previous one taken out first), against
    loading a file into a model with those adapters and merging it, and a copy of the
    base weights. Timed only: merges are checked by the tests."""
    s2ft = [n for n in files if n.startswith("s2ft")][:2]
    krona = [n for n in files if n.startswith("krona")][:2]
    adapted = kronops.load_adapters(copy.deepcopy(base), files[krona[0]])
    weights = [p for p in base.parameters()]

    def switcher(names):
        turn = iter(range(1 << 62))

        def run(i):
            bank.merge(names[next(turn) % 2])
        return run

    def from_file(i):
        if any(m.merged for m in kronops.adapters.adapter_modules(adapted).values()):
            kronops.unmerge_adapters(adapted)
        kronops.load_adapters(adapted, files[krona[i % 2]])
        kronops.merge_adapters(adapted)

    def copy_weights(i):
        with torch.no_grad():
            for p in weights:
                p.clone()

    providers = {"kronops bank.merge, S²FT (switch)": switcher(s2ft),
                 "kronops bank.merge, KronA (switch)": switcher(krona),
                 "naive: load_adapters(file) + merge_adapters, KronA": from_file,
                 "copy of every base weight": copy_weights}
    params = sum(p.numel() for p in weights)
    return Case("AdapterBank switch", "merge", f"LLaMA {params / 1e6:.1f}M params; {memory}",
                params, 2 * params * element_bytes(dtype), 0, providers, lambda: None,
                set(providers))
