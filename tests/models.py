"""Tiny random models the tests build (nothing downloaded), and inputs for them.

``tiny_llama`` (a LLaMA with grouped-query attention), ``llama_12_heads``, ``tiny_bert``,
with ``llama_batch``, ``bert_batch`` and ``ids``; ``randomize_b`` gives KronA adapters a
nonzero B; ``randomly_trained`` applies an adapter with random values. ``FAMILIES`` holds a tiny model of every family kronops supports, built from
transformers' own classes: ``build`` makes one, ``family_batch`` and ``family_logits`` feed it.

Each ``FAMILIES`` entry: (config class name, model class name, config kwargs, seq2seq). Sizes
are chosen so that every layout kronops handles appears: grouped-query attention (LLaMA, Phi-3,
Falcon's new decoder architecture), fused q/k/v (Phi-3, GPT-2, GPT-NeoX, Falcon), a fused
gate/up projection (Phi-3), Conv1D weights (GPT-2), gated T5 FFNs (mT5), cross-attention
(T5, mT5, BART), multi-query attention (Falcon) and per-head position state (T5's relative
bias, BLOOM's ALiBi).
"""
import copy

import torch
import transformers

import kronops
from kronops import KronALinear
from kronops.adapters import adapter_modules, select
from kronops.s2ft import S2FTInPlaceLinear


def tiny_llama(dtype=torch.float32, layers=2, bias=False):
    """A random LLaMA with grouped-query attention: 6 query heads on 2 K/V heads of 8, 40 FFN
    channels, ``layers`` blocks."""
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=layers,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        attention_bias=bias, mlp_bias=bias)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def llama_12_heads(layers, dtype=torch.float32):
    """12 query heads on 4 K/V heads of size 4 per block, 40 FFN channels, ``layers`` blocks."""
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=layers,
        num_attention_heads=12, num_key_value_heads=4, head_dim=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def tiny_bert(labels=3):
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=48,
                                     max_position_embeddings=32, num_labels=labels)
    return transformers.BertForSequenceClassification(config).eval()


def ids(vocab=97, n=2, t=9):
    return torch.randint(0, vocab, (n, t))


def llama_batch(n=2, t=11):
    """A language-modelling batch for ``tiny_llama``: its tokens are its labels."""
    ids = torch.randint(0, 97, (n, t))
    return dict(input_ids=ids, labels=ids)


def bert_batch(n=3, t=7):
    """A classification batch for ``tiny_bert``."""
    return dict(input_ids=torch.randint(0, 50, (n, t)), labels=torch.randint(0, 3, (n,)))


def randomize_b(model):
    """Give every KronA factor B a nonzero value (B starts at 0)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, KronALinear):
                m.b.normal_(std=0.3)


VOCAB = 61
_DECODER = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=40)
_T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=2,
           num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
_BART = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
             encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=40,
             decoder_ffn_dim=40, max_position_embeddings=64, pad_token_id=1, bos_token_id=0,
             eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
_GPT = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
            eos_token_id=0)
_IDS = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_DECODER, num_key_value_heads=2, **_IDS),
              False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_DECODER, num_key_value_heads=2, **_IDS),
              False),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_DECODER, num_key_value_heads=2, **_IDS),
             False),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_DECODER, **_IDS), False),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_DECODER, **_IDS), False),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    **_IDS), False),
    "falcon_grouped": ("FalconConfig", "FalconForCausalLM",
                       dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2,
                            **_IDS), False),
    "bloom": ("BloomConfig", "BloomForCausalLM",
              dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4, **_IDS), False),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 ffn_dim=40, max_position_embeddings=64, word_embed_proj_dim=32, **_IDS), False),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _GPT, False),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(_GPT, rotary_dim=4), False),
    "bert": ("BertConfig", "BertForMaskedLM",
             dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=40, max_position_embeddings=64), False),
    "t5": ("T5Config", "T5ForConditionalGeneration", _T5, True),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration",
            dict(_T5, feed_forward_proj="gated-gelu"), True),
    "bart": ("BartConfig", "BartForConditionalGeneration", _BART, True),
}


def build(family: str, dtype=torch.float64) -> torch.nn.Module:
    """A tiny model of ``family`` in eval mode (no dropout), with fixed-seed weights."""
    config_name, model_name, kwargs, _ = FAMILIES[family]
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).to(dtype).eval()


def family_batch(family: str, seed: int = 0) -> dict:
    """Inputs for ``family``'s model: 2 sequences of 7 tokens (and 5 decoder tokens)."""
    g = torch.Generator().manual_seed(seed)
    inputs = dict(input_ids=torch.randint(3, VOCAB, (2, 7), generator=g))
    if FAMILIES[family][3]:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (2, 5), generator=g)
    return inputs


def family_logits(model, family: str, seed: int = 0) -> torch.Tensor:
    return model(**family_batch(family, seed)).logits


def randomly_trained(base, method: str, options: dict, seed: int, scale: float):
    """A copy of ``base`` with ``apply_adapters(method, **options)`` and random "trained"
    values of size ``scale`` (S²FT: a plan drawn with ``seed``; in-place S²FT: the selected
    weights moved by that much; every other adapter parameter set to it)."""
    model = copy.deepcopy(base)
    if method == "s2ft":
        options = dict(options, plan=select(model, heads=0.5, channels=0.25, seed=seed))
    kronops.apply_adapters(model, method, **options)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_modules(model).values():
            if isinstance(layer, S2FTInPlaceLinear):
                w, dim = layer.base_weight, 1 if layer.mode == "cols" else 0
                part = w.index_select(dim, layer.indices())
                w.index_add_(dim, layer.indices(), scale * torch.randn(part.shape, generator=g,
                                                                       dtype=w.dtype))
            else:
                for p in layer.parameters():
                    if p.requires_grad:
                        p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def materialised(update, shape) -> torch.Tensor:
    """ΔW (``shape``) of a serving update (``KronUpdate``: kron(a, b); ``SparseUpdate``: its Δ
    added into zeros at its selection), materialised: the naive reference."""
    from kronops.adapters.methods.updates import KronUpdate
    if isinstance(update, KronUpdate):
        return torch.kron(update.a, update.b)
    w = torch.zeros(shape, dtype=update.delta.dtype)
    update.selection.add_into(w, update.delta)
    return w
