"""KronA and S²FT adapters under DistributedDataParallel and FSDP2 (fully_shard) on CPU: 2 gloo
processes spawned by the test, each training on half the batch, end with the same adapter
weights as one process training on the whole batch."""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import assert_close

CASES = [(method, wrapper) for method in ("krona", "s2ft") for wrapper in ("ddp", "fsdp2")]
STEPS, LR, BATCH, SEQ = 3, 0.5, 4, 9


def build(method):
    """The same tiny float64 LLaMA with fresh adapters in every process (fixed seeds)."""
    from models import tiny_llama

    from kronops.adapters.apply import apply_adapters
    torch.manual_seed(0)
    model = tiny_llama(torch.float64)
    config = dict(rank=2, alpha=4) if method == "krona" else dict(heads=2, channels=5, seed=1)
    apply_adapters(model, method, verbose=False, **config)
    return model.train()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (BATCH, SEQ), generator=g)


def train(model, x, params):
    opt = torch.optim.SGD(params, lr=LR)
    for _ in range(STEPS):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def trainable(model) -> dict[str, torch.Tensor]:
    """Trainable parameters by name (DDP/FSDP prefixes removed; FSDP shards gathered)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name.removeprefix("module.")] = full.detach().clone()
    return out


def worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only: no network needed
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.nn.parallel import DistributedDataParallel
        x = data().chunk(world)[rank]
        results = {}
        for method, wrapper in CASES:
            model = build(method)
            if wrapper == "ddp":
                model = DistributedDataParallel(model)
            else:
                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(model)
            train(model, x, [p for p in model.parameters() if p.requires_grad])
            results[method, wrapper] = trainable(model)
            if wrapper == "fsdp2":  # every rank calls it; shards gathered, rank 0 writes
                from kronops.adapters.files import save_adapters
                save_adapters(model, f"{path}.{method}.safetensors")
        if rank == 0:
            torch.save(results, path)
        dist.barrier()  # neither process leaves while the other may still talk to it
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = tmp_path_factory.mktemp("dist") / "results.pt"
    sys.path.insert(0, os.path.dirname(__file__))  # spawned workers import this module
    mp.spawn(worker, args=(2, port, str(path)), nprocs=2, join=True)
    return dict(torch.load(path), path=str(path))


@pytest.mark.parametrize("method, wrapper", CASES)
def test_two_processes_match_one_process_on_the_combined_batch(distributed_results, method,
                                                                wrapper):
    from models import tiny_llama
    reference = build(method)
    start = trainable(reference)
    train(reference, data(), [p for p in reference.parameters() if p.requires_grad])
    expected = trainable(reference)
    got = distributed_results[method, wrapper]
    assert got.keys() == expected.keys() and len(got) > 0
    moved = 0
    for name, value in expected.items():
        assert_close(got[name], value, value.dtype, f"{wrapper} {method} {name}")  # S²FT Δ: fp32
        moved += not torch.equal(value, start[name])
    assert moved == len(expected)  # every adapter tensor was trained
    if wrapper == "fsdp2":  # the adapter file saved from the sharded model
        from kronops.adapters.files import load_adapters
        torch.manual_seed(0)  # the base the workers trained on
        fresh = tiny_llama(torch.float64)
        load_adapters(fresh, f"{distributed_results['path']}.{method}.safetensors")
        loaded = {n: p for n, p in fresh.named_parameters() if n in expected}
        assert loaded.keys() == expected.keys()
        for name, value in expected.items():
            assert_close(loaded[name], value, value.dtype, f"saved from fsdp2 {method} {name}")
