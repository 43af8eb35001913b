"""AdapterBank: each row of a mixed batch equals its adapter alone, generate() with routes,
merge/switch/unmerge round trips, and files or routes that are refused without changes."""
import copy

import pytest
import torch
from conftest import assert_close
from models import VOCAB, build, randomly_trained

import kronops
from kronops.adapters import AdapterFileError, adapter_modules
from kronops.serving import AdapterBank

# name -> (method, apply_adapters options): two KronA and two S²FT adapters.
ADAPTERS = {
    "krona": ("krona", dict()),
    "krona_lowrank": ("krona", dict(rank=2, alpha=3.0)),
    "s2ft": ("s2ft", dict(mode="adapter")),
    "s2ft_inplace": ("s2ft", dict(mode="inplace")),
}
# KronA^B (the KronA paper's T5 adapters), with and without the residual term.
BLOCK_ADAPTERS = {
    "block": ("krona_block", dict(rank=2)),
    "block_res": ("krona_block", dict(residual=True)),
}


def trained(base, name: str, seed: int):
    """A copy of ``base`` with adapter ``name`` applied and given random trained values."""
    method, options = {**ADAPTERS, **BLOCK_ADAPTERS}[name]
    return randomly_trained(base, method, options, seed, scale=0.1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """family -> {adapter name: file} for tiny fp64 models."""
    made = {}
    for family in ("llama", "bert", "gpt2"):
        base = build(family)
        folder = tmp_path_factory.mktemp(family)
        made[family] = {}
        for seed, name in enumerate(ADAPTERS):
            path = folder / f"{name}.safetensors"
            kronops.save_adapters(trained(base, name, seed), path)
            made[family][name] = path
    return made


def bank_of(family: str, files, dtype=torch.float64, device="cpu"):
    base = build(family, dtype).to(device)
    bank = AdapterBank(base)
    for name, path in files[family].items():
        bank.load(name, path)
    return base, bank


def alone(base, path):
    """``base`` with one adapter file loaded the ordinary way (a copy)."""
    return kronops.load_adapters(copy.deepcopy(base), path).eval()


def ids(rows: int, seq: int = 6, seed: int = 0):
    return torch.randint(3, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


ROUTE = ["s2ft", None, "krona", "s2ft_inplace", "krona_lowrank", "krona", "s2ft"]


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_mixed_batch_rows_equal_each_adapter_alone(family, files):
    base, bank = bank_of(family, files)
    batch = ids(len(ROUTE))
    with torch.no_grad():
        with bank.route(ROUTE):
            mixed = base(batch).logits
        for row, name in enumerate(ROUTE):
            model = base if name is None else alone(base, files[family][name])
            ref = model(batch).logits
            assert_close(mixed[row], ref[row], torch.float64, f"row {row} ({name})")
        plain = base(batch).logits
    for row, name in enumerate(ROUTE):  # every adapter changes its rows
        assert (name is None) == torch.equal(mixed[row], plain[row])


def test_mixed_batch_through_the_triton_kernels(files, triton_backend):
    """fp32 through the routed kernels (interpreter on CPU) against fp64 adapters alone."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, bank = bank_of("llama", files, torch.float32, device)
    base64 = build("llama")
    batch = ids(len(ROUTE))
    with torch.no_grad():
        with bank.route(ROUTE):
            mixed = base(batch.to(device)).logits
        for row, name in enumerate(ROUTE):
            model = base64 if name is None else alone(base64, files["llama"][name])
            assert_close(mixed[row], model(batch).logits[row], torch.float32, f"row {row}")


def test_krona_block_adapters_route_on_t5(tmp_path):
    """KronA^B(_res) on T5's sub-layers (input: the sub-layer's first projection's input,
    encoder, decoder and cross-attention) beside KronA and S²FT, each row as alone; a
    KronA^B adapter cannot be merged."""
    base = build("t5")
    paths = {}
    for seed, name in enumerate(["block", "block_res", "krona", "s2ft"]):
        paths[name] = tmp_path / f"{name}.safetensors"
        kronops.save_adapters(trained(base, name, seed), paths[name])
    bank = AdapterBank(base)
    for name, path in paths.items():
        bank.load(name, path)
    route = ["block_res", "s2ft", None, "block", "krona", "block_res"]
    inputs = dict(input_ids=ids(len(route)), decoder_input_ids=ids(len(route), 4, seed=1))
    with torch.no_grad():
        with bank.route(route):
            mixed = base(**inputs).logits
        for row, name in enumerate(route):
            model = base if name is None else alone(base, paths[name])
            assert_close(mixed[row], model(**inputs).logits[row], torch.float64, f"{name}")
    settings = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    with bank.route(route, rows_per_name=2):  # the encoder sees one row per name, the decoder 2
        generated = base.generate(inputs["input_ids"], **settings)
    for row, name in enumerate(route):
        model = base if name is None else alone(base, paths[name])
        assert torch.equal(generated[row], model.generate(inputs["input_ids"], **settings)[row])
    with pytest.raises(RuntimeError, match="cannot be merged"):
        bank.merge("block")
    assert bank.merged is None


def test_route_by_slot_tensor_equals_route_by_name(files):
    base, bank = bank_of("llama", files)
    slots = torch.tensor([-1 if n is None else bank.names.index(n) for n in ROUTE])
    batch = ids(len(ROUTE))
    with torch.no_grad():
        with bank.route(ROUTE):
            by_name = base(batch).logits
        with bank.route(slots):
            by_slot = base(batch).logits
    assert torch.equal(by_name, by_slot)


def test_generate_holds_the_route_with_padding_and_beams(files):
    base, bank = bank_of("llama", files)
    route = ["krona", "s2ft_inplace", None, "s2ft"]
    prompts = ids(len(route), seq=5)
    mask = torch.ones_like(prompts)
    mask[1, :2] = 0  # left padding
    mask[3, :1] = 0
    prompts = prompts.masked_fill(mask == 0, 0)
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for beams in (1, 2):
        with bank.route(route, rows_per_name=beams):
            mixed = base.generate(prompts, num_beams=beams, **settings)
        for row, name in enumerate(route):
            model = base if name is None else alone(base, files["llama"][name])
            ref = model.generate(prompts, num_beams=beams, **settings)
            assert torch.equal(mixed[row], ref[row]), (beams, row, name)


def test_a_route_is_read_as_beams_only_when_asked(files):
    """Three names on a 6-row batch are not silently two rows each: refused, naming both
    lengths; with rows_per_name=2 they are, exactly as the six names spelled out."""
    base, bank = bank_of("llama", files)
    route = ["krona", None, "s2ft"]
    batch = ids(6)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"route of 3 names for a batch of 6 rows: the "
                                             r"batch must have 3 rows"):
            with bank.route(route):
                base(batch)
        with pytest.raises(ValueError, match=r"route of 3 names for a batch of 4 rows: the "
                                             r"batch must have 3 \(one per name\) or 6 "
                                             r"\(2 per name\) rows"):
            with bank.route(route, rows_per_name=2):
                base(ids(4))
        with bank.route(route, rows_per_name=2):
            beams = base(batch).logits
        with bank.route([name for name in route for _ in range(2)]):
            spelled = base(batch).logits
        with bank.route(route, rows_per_name=2):  # one row per name is still one per name
            single = base(batch[::2]).logits
    assert torch.equal(beams, spelled)
    assert_close(single, spelled[::2], torch.float64, "one row per name")


def test_a_model_that_folds_the_sequence_into_the_rows(tmp_path):
    """OPT's FFN takes (batch x seq, hidden): routed by the rows it folds; a route of
    another length than the batch is still refused when only those layers are adapted."""
    base = build("opt")
    paths = {}
    for seed, name in enumerate(["krona", "s2ft"]):
        model = copy.deepcopy(base)
        if name == "krona":
            kronops.apply_adapters(model, "krona", target_modules=["fc1", "fc2"])
        else:
            kronops.apply_adapters(model, "s2ft", heads=0, channels=0.25, seed=seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.1)
        paths[name] = tmp_path / f"{name}.safetensors"
        kronops.save_adapters(model, paths[name])
    bank = AdapterBank(base)
    for name, path in paths.items():
        bank.load(name, path)
    route = ["s2ft", None, "krona"]
    batch = ids(len(route))
    with torch.no_grad():
        with bank.route(route):
            mixed = base(batch).logits
        for row, name in enumerate(route):
            model = base if name is None else alone(base, paths[name])
            assert_close(mixed[row], model(batch).logits[row], torch.float64, f"{name}")
        with pytest.raises(ValueError, match="route of 3 names for a batch of 6 rows"):
            with bank.route(route):
                base(ids(6))


def test_merge_switch_unmerge(files):
    """Merging runs the adapter's fine-tuned model; switching takes the previous merge out
    first; each KronA merge/unmerge cycle leaves every weight within u (|w| + |w'|) of
    itself (w' its merged value), S²FT cycles leave it exact."""
    base, bank = bank_of("llama", files)
    original = copy.deepcopy(base.state_dict())
    bound = {k: torch.zeros_like(v) for k, v in original.items()}
    u = torch.finfo(torch.float64).eps / 2
    batch = ids(3)
    for name in ["krona", "s2ft", "s2ft_inplace", "krona_lowrank", "s2ft"]:  # direct switches
        bank.merge(name)
        assert bank.merged == name
        with torch.no_grad():
            ref = alone(base_copy(original), files["llama"][name])(batch).logits
            assert_close(base(batch).logits, ref, torch.float64, f"merged {name}")
        if name.startswith("krona"):
            for key, value in base.state_dict().items():
                bound[key] += u * (original[key].abs() + value.abs())
    bank.unmerge()
    assert bank.merged is None
    for key, value in base.state_dict().items():
        assert torch.all((value - original[key]).abs() <= 1.01 * bound[key]), key


def base_copy(state):
    model = build("llama")
    model.load_state_dict(state)
    return model


def test_s2ft_unmerge_is_exact_and_inplace_merge_gives_the_saved_weights(files, tmp_path):
    base = build("llama", torch.float32)
    bank = AdapterBank(base)
    trained_model = trained(base, "s2ft_inplace", seed=5)
    path = tmp_path / "inplace.safetensors"
    kronops.save_adapters(trained_model, path)
    bank.load("inplace", path)
    bank.load("delta", files["llama"]["s2ft"])
    original = copy.deepcopy(base.state_dict())
    bank.merge("inplace")
    for name, layer in adapter_modules(trained_model).items():
        assert torch.equal(base.get_submodule(name).weight, layer.base.weight)
    bank.merge("delta")
    bank.unmerge()
    for key, value in base.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_krona_unmerge_stays_within_its_bound_in_bf16(files):
    """Each element comes back within u (|w| + |w'|) of itself, u = 2^-8 for bf16."""
    base = build("llama", torch.bfloat16)
    bank = AdapterBank(base)
    bank.load("krona", files["llama"]["krona"])
    original = {k: v.float() for k, v in base.state_dict().items()}
    for _ in range(3):
        bank.merge("krona")
        merged = {k: v.float() for k, v in base.state_dict().items()}
        bank.unmerge()
        for key, value in base.state_dict().items():
            bound = 2.0 ** -8 * (original[key].abs() + merged[key].abs())
            assert torch.all((value.float() - original[key]).abs() <= bound), key
        original = {k: v.float() for k, v in base.state_dict().items()}


def test_unload_keeps_the_others_routing(files):
    base, bank = bank_of("llama", files)
    used = sum(bank.nbytes(n) for n in bank.names)
    assert bank.nbytes("s2ft") > bank.nbytes("krona") > 0
    bank.unload("krona")
    assert bank.names == ["krona_lowrank", "s2ft", "s2ft_inplace"]
    assert sum(bank.nbytes(n) for n in bank.names) < used
    route = ["s2ft_inplace", "krona_lowrank", None]
    batch = ids(3)
    with torch.no_grad():
        with bank.route(route):
            mixed = base(batch).logits
        for row, name in enumerate(route):
            model = base if name is None else alone(base, files["llama"][name])
            assert_close(mixed[row], model(batch).logits[row], torch.float64, name)
    for name in bank.names:
        bank.unload(name)
    with torch.no_grad(), bank.route([None, None, None]):
        assert torch.equal(base(batch).logits, build("llama")(batch).logits)


def unchanged(base, bank, names, state):
    assert bank.names == names
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_refused_files_leave_bank_and_model_as_they_were(files, tmp_path):
    base, bank = bank_of("llama", files)
    names, state = bank.names, copy.deepcopy(base.state_dict())
    other = build("gpt2")  # another base model
    kronops.apply_adapters(other, "krona")
    kronops.save_adapters(other, tmp_path / "other.safetensors")
    heads = build("llama")
    kronops.apply_adapters(heads, "krona", train_modules=["lm_head"])
    kronops.save_adapters(heads, tmp_path / "heads.safetensors")
    corrupt = bytearray(files["llama"]["krona"].read_bytes())
    corrupt[-3] ^= 0x10
    (tmp_path / "corrupt.safetensors").write_bytes(bytes(corrupt))
    for file, match in [("other", "is missing in the model"),
                        ("heads", "trains whole modules"), ("corrupt", "checksum")]:
        with pytest.raises(AdapterFileError, match=match):
            bank.load(file, tmp_path / f"{file}.safetensors")
        unchanged(base, bank, names, state)
    with pytest.raises(ValueError, match="already loaded"):
        bank.load("krona", files["llama"]["krona"])
    bank.merge("s2ft")
    with pytest.raises(RuntimeError, match="unmerge"):
        bank.load("again", files["llama"]["krona"])
    bank.unmerge()
    unchanged(base, bank, names, state)


def test_bad_routes_raise_before_anything_runs(files):
    base, bank = bank_of("llama", files)
    batch = ids(2)
    with torch.no_grad():
        plain = base(batch).logits
    for names, error, match in [
            (["krona", "nope"], ValueError, "'nope' are not loaded"),
            ([], TypeError, "non-empty list"), ("krona", TypeError, "non-empty list"),
            (torch.tensor([0, 4]), ValueError, "\\[-1, 4\\)"),
            (torch.tensor([0.0, 1.0]), ValueError, "int64"),
            (torch.tensor([[0, 1]]), ValueError, "1-D")]:
        with pytest.raises(error, match=match):
            with bank.route(names):
                pass
    with pytest.raises(ValueError, match="route of 3 names for a batch of 2 rows"), \
            torch.no_grad():
        with bank.route(["krona", None, "s2ft"]):
            base(batch)
    for k, error, match in [(0, ValueError, "rows_per_name must be a positive int, got 0"),
                            (True, TypeError, "rows_per_name must be a positive int, got True"),
                            (2.0, TypeError, "rows_per_name must be a positive int, got 2.0")]:
        with pytest.raises(error, match=match):
            with bank.route(["krona", None], rows_per_name=k):
                pass
    with pytest.raises(RuntimeError, match="inference"):
        with bank.route(["krona", None]):
            base(batch)
    with bank.route(["krona", None]):
        for action, call in [("route", lambda: bank.route([None]).__enter__()),
                             ("merge", lambda: bank.merge("krona")),
                             ("unload", lambda: bank.unload("krona"))]:
            with pytest.raises(RuntimeError, match="inside bank.route"):
                call()
    bank.merge("krona")
    with pytest.raises(RuntimeError, match="merged"):
        with bank.route(["krona", None]):
            pass
    with pytest.raises(RuntimeError, match="unmerge"):
        bank.unload("krona")
    bank.unmerge()
    with pytest.raises(RuntimeError, match="no adapter is merged"):
        bank.unmerge()
    with pytest.raises(KeyError, match="nope"):
        bank.merge("nope")
    with torch.no_grad():  # every failed route took its hooks with it
        assert torch.equal(base(batch).logits, plain)


def test_bank_takes_only_a_plain_model():
    model = build("llama")
    kronops.apply_adapters(model, "krona")
    with pytest.raises(ValueError, match="plain base model"):
        AdapterBank(model)
    with pytest.raises(TypeError, match="nn.Module"):
        AdapterBank("llama")


def test_a_model_adapted_after_loading_is_refused(files):
    base, bank = bank_of("llama", files)
    kronops.apply_adapters(base, "krona")
    with pytest.raises(RuntimeError, match="layers changed"), torch.no_grad():
        with bank.route(["krona", None]):
            pass


def test_a_model_moved_after_loading_is_named(files):
    base, bank = bank_of("llama", files)
    base.to(torch.float32)
    with pytest.raises(RuntimeError, match="moved after loading"), torch.no_grad():
        with bank.route(["krona", None]):
            base(ids(2))


def test_route_under_inference_mode_and_autocast(files):
    """inference_mode gives the no_grad result bit for bit; under bf16 autocast the
    adapters run in bf16 beside the base (relative error of bf16's order, 2^-8 per
    rounding over a few layers)."""
    base, bank = bank_of("llama", files, torch.float32)
    route = ["krona", "s2ft", None, "s2ft_inplace"]
    batch = ids(len(route))
    with torch.no_grad(), bank.route(route):
        plain = base(batch).logits
    with torch.inference_mode(), bank.route(route):
        assert torch.equal(base(batch).logits, plain)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), bank.route(route):
        low = base(batch).logits
    assert ((low.float() - plain).norm() / plain.norm()).item() < 2 ** -8 * 8
