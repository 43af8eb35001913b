"""The default case sets: CPU (about two minutes on 2 cores) and --full (GPU, real model shapes)."""
from .kron_cases import krona_layer_cases, kron_linear_cases, kron_matmul_cases
from .s2ft_cases import inplace_adamw_cases
from .s2ft_model_cases import llama_step_cases
from .sparse_cases import sparse_linear_cases


# Two decoder layers of LLaMA-3-8B's shape (GQA 32/8 heads of 128), and a small one for CPU.
LLAMA_8B_LAYERS = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000)
SMALL_LLAMA = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, vocab_size=512)


def default_cases(full: bool, dtype, device):
    """The CPU set (about two minutes on 2 cores) or the GPU set (--full: LLaMA/MiniLM shapes)."""
    if full:
        rows = 16384
        for k, n in [(4096, 4096), (4096, 11008), (4096, 14336), (384, 1536)]:
            yield from kron_linear_cases(rows, k, n, dtype, device)
        yield from kron_matmul_cases(rows, [(16, 16)] * 3, dtype, device)
        yield from kron_matmul_cases(rows, [(64, 64), (64, 64)], dtype, device)
        for k, n in [(4096, 4096), (4096, 14336)]:
            yield from krona_layer_cases(rows, k, n, dtype, device)
        for k, n, mode in [(4096, 4096, "rows"), (4096, 14336, "rows"), (14336, 4096, "cols")]:
            yield from sparse_linear_cases(rows, k, n, 0.05, mode, dtype, device)
        yield from inplace_adamw_cases(4096, 14336, 0.05, dtype, device)
        yield from llama_step_cases(LLAMA_8B_LAYERS, 4, 2048, 0.05, dtype, device)
    else:
        for rows, k, n in [(256, 1024, 1024), (1024, 4096, 4096), (2048, 384, 1536)]:
            yield from kron_linear_cases(rows, k, n, dtype, device)
        yield from kron_matmul_cases(512, [(16, 16)] * 3, dtype, device)
        yield from krona_layer_cases(1024, 1024, 1024, dtype, device)
        for k, n, mode in [(1024, 1024, "rows"), (2048, 512, "cols")]:
            yield from sparse_linear_cases(1024, k, n, 0.05, mode, dtype, device)
        yield from inplace_adamw_cases(1024, 4096, 0.05, dtype, device)
        yield from llama_step_cases(SMALL_LLAMA, 4, 128, 0.1, dtype, device)
