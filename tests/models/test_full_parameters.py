"""Generation under FSDP2 runs no collective: two gloo processes decode different numbers of tokens
inside ``full_parameters`` (the rank that stops first would otherwise leave the other waiting in
an all-gather forever), get the logits of the unsharded model, and train on sharded parameters
again afterwards."""

import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _worker(rank: int, port: int, out: str, tied: bool) -> None:
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule

    from grape_lightning.models.full_parameters import full_parameters
    from grape_lightning.models.loading import load_causal_lm, load_tokenizer
    from grape_lightning.models.sharding import shard_causal_lm
    from grape_lightning.rollout import KVCacheEngine, SamplingParams
    from grape_lightning.rollout.static_cache_engine import StaticCacheEngine
    from tests.conftest import TINY_CONFIG, tiny_spec

    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    spec = tiny_spec(dtype="float64", config={**TINY_CONFIG, "tie_word_embeddings": tied})
    tokenizer = load_tokenizer(spec)
    model = load_causal_lm(spec, tokenizer).eval()
    unsharded = copy.deepcopy(model)
    shard_causal_lm(model, init_device_mesh("cpu", (2,)))
    prompts = [tokenizer.encode("12+34=")] * 2
    params = SamplingParams(max_new_tokens=2 + 6 * rank, temperature=0.0)  # rank 1 decodes 4x as long
    owner = types.SimpleNamespace(_trainer=None)
    with torch.no_grad(), full_parameters(owner, model) as full:
        generation = KVCacheEngine(tokenizer).generate(full, prompts, params)
        static = StaticCacheEngine(tokenizer).generate(full, prompts, params)  # the GPU engine, eager here
        logits = full(input_ids=generation.input_ids).logits
    expected = KVCacheEngine(tokenizer).generate(unsharded, prompts, params)
    with torch.no_grad():
        expected_logits = unsharded(input_ids=generation.input_ids).logits
    # sharded again: a training forward and backward with the FSDP hooks
    model.train()
    model(input_ids=generation.input_ids).logits.sum().backward()
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    sharded &= model.get_output_embeddings().weight is model.get_input_embeddings().weight if tied else True
    torch.save({
        "tokens": generation.input_ids, "expected_tokens": expected.input_ids, "static_tokens": static.input_ids,
        "gap": float((logits - expected_logits).abs().max()), "sharded": sharded,
        "units": len({id(m._get_fsdp_state()) for m in model.modules() if isinstance(m, FSDPModule)}),
    }, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()
    # Skip interpreter teardown, where a gloo thread still running can abort the process
    # ("terminate called without an active exception") after the work is done.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_ranks_decode_different_lengths_under_fsdp2_without_hanging(tmp_path, tied):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tests.models.test_full_parameters", str(_free_port()), str(tmp_path), str(int(tied))]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)  # a hang fails here
    assert result.returncode == 0, result.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [r["tokens"].shape[1] - 6 for r in ranks] == [2, 8]  # different numbers of decoding forwards
    for r in ranks:
        assert torch.equal(r["tokens"], r["expected_tokens"])  # greedy decoding as the unsharded model
        assert torch.equal(r["static_tokens"], r["expected_tokens"])
        assert r["gap"] < 1e-12
        assert r["sharded"] and r["units"] == 4  # 2 layers, the trunk, the LM head (with the input embedding if tied)


if __name__ == "__main__":
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(int(sys.argv[1]), sys.argv[2], bool(int(sys.argv[3]))), nprocs=2)
