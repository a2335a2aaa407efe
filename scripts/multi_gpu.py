"""Every algorithm under every strategy on N devices: median step time, identical weights on every
rank, and (``--compare``) how far each strategy's weights end from the first strategy's.

    # on a machine with N GPUs: Qwen2.5-0.5B shape (random weights), char tokenizer
    python scripts/multi_gpu.py --devices 8 --strategies ddp fsdp2 --precision bf16-true
    python scripts/multi_gpu.py --devices 2 --strategies ddp fsdp2 deepspeed_stage_2 deepspeed_stage_3 --algorithms grpo dpo
    # every algorithm under every strategy, tiny model in float32, weights compared to ddp's
    python scripts/multi_gpu.py --tiny --compare --micro_batch_size 4 --parallel 4 \
        --strategies ddp fsdp2 deepspeed_stage_2 deepspeed_stage_3
    # a quick smoke run on CPU (tiny model, gloo)
    python scripts/multi_gpu.py --tiny --accelerator cpu --devices 2 --strategies ddp fsdp2

Strategies are Lightning's names (``ddp``, ``fsdp``, ``deepspeed_stage_2``, ...) plus ``fsdp2``
(``grape_lightning.strategies.FSDP2Strategy``: FSDP2 over every device, in the units of
``grape_lightning.models.sharding``). Lightning's ``fsdp`` (FSDP1) runs SFT, DPO and the reward
model; the on-policy algorithms refuse it and name ``fsdp2``; TRPO runs under ddp only.

Each (algorithm, strategy) runs in its own process group (a child process, which Lightning's
launcher turns into ``--devices`` processes), so a failure or a hang of one cell (``--timeout``)
does not stop the table. A step is one training batch: for the on-policy algorithms one rollout
(generation, scoring, reference log-probs and the update), for SFT, DPO and the reward model one
optimizer step. The median skips ``--warmup`` steps. At the end every rank hashes the full policy
(gathered under FSDP and ZeRO-3) and the cell reports whether all hashes agree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALGORITHMS = ["sft", "dpo", "reward_model", "rejection_sampling", "reinforce", "grpo", "grape", "ppo", "trpo"]

# Qwen2.5-0.5B's shape (random weights): hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, tied embeddings
QWEN25_05B = {
    "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
    "tie_word_embeddings": True, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
}
TINY = {
    "model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False,
}
RUBRIC = "default_category: math\ncategories:\n  math:\n    - {name: correct, weight: 1.0, kind: verifiable, check: numeric_match}\n"


def build(algorithm: str, tiny: bool, workdir: Path, micro_batch_size: int = 64):
    """(module, datamodule) of ``algorithm`` at the benchmark's sizes."""
    from grape_lightning import algorithms as A
    from grape_lightning.data import PreferenceDataModule, SFTDataModule
    from grape_lightning.data.tasks import ArithmeticTask
    from grape_lightning.models.spec import ModelSpec
    from grape_lightning.rewards import NumericMatch
    from grape_lightning.rollout import RolloutDataModule, SamplingParams

    spec = ModelSpec(config=dict(TINY if tiny else QWEN25_05B), tokenizer="grape/char", dtype="float32" if tiny else "bfloat16")
    task = ArithmeticTask(num_train=4096, num_val=8)
    prompts, group, new_tokens = (2, 4, 8) if tiny else (16, 8, 128)  # per device
    sampling = SamplingParams(max_new_tokens=new_tokens, temperature=1.0)
    on_policy = dict(rewards=[NumericMatch()], sampling=sampling, micro_batch_size=micro_batch_size)
    if algorithm == "sft":
        return A.SFTModule(spec), SFTDataModule(task=task, batch_size=8 if tiny else 32, max_length=32 if tiny else 256)
    if algorithm in ("dpo", "reward_model"):
        data = PreferenceDataModule(task=task, batch_size=8 if tiny else 32, max_length=32 if tiny else 256)
        module = A.DPOModule(spec) if algorithm == "dpo" else A.RewardModelModule(spec)
        return module, data
    modules = {
        "rejection_sampling": lambda: A.RejectionSamplingModule(spec, **on_policy),
        "reinforce": lambda: A.REINFORCEModule(spec, **on_policy),
        "grpo": lambda: A.GRPOModule(spec, beta=0.04, **on_policy),
        "ppo": lambda: A.PPOModule(
            spec, rewards=on_policy["rewards"], sampling=sampling, update=A.UpdateConfig(epochs=1, micro_batch_size=micro_batch_size)
        ),
        "trpo": lambda: A.TRPOModule(spec, rewards=[NumericMatch()], sampling=sampling, micro_batch_size=micro_batch_size),
    }
    if algorithm == "grape":
        rubric = workdir / "rubric.yaml"
        rubric.write_text(RUBRIC)
        module = A.GRAPEModule(spec, rubric=str(rubric), sampling=sampling, beta=0.04, micro_batch_size=micro_batch_size)
    else:
        module = modules[algorithm]()
    return module, RolloutDataModule(task=task, group_size=group, batch_size=prompts, max_val_prompts=8)


def trained_weights(module) -> dict:
    """The full trained weights on this rank, in float32 on the CPU (gathered where the strategy
    shards them; every rank must call it): the policy, or the reward model."""
    import torch

    from grape_lightning.models.full_parameters import full_parameters

    trained = module.policy if hasattr(module, "policy") else module.reward_model
    weights = {}
    with full_parameters(module, trained, forward=False):
        for name, tensor in sorted(trained.state_dict().items()):
            if hasattr(tensor, "full_tensor"):  # a DTensor (FSDP2 state dicts stay sharded)
                tensor = tensor.full_tensor()
            weights[name] = tensor.detach().to("cpu", torch.float32).clone()
    return weights


def digest(weights: dict) -> str:
    hashed = hashlib.sha256()
    for name, tensor in weights.items():
        hashed.update(name.encode())
        hashed.update(tensor.contiguous().numpy().tobytes())
    return hashed.hexdigest()


def worker(options: argparse.Namespace) -> None:
    """One cell: runs under Lightning's launcher (every rank executes this)."""
    import lightning as L
    import torch

    L.seed_everything(0)
    workdir = Path(options.out).parent
    module, data = build(options.algorithm, options.tiny, workdir, options.micro_batch_size)
    data.set_tokenizer(module.tokenizer)
    times: list[float] = []

    class StepTimer(L.Callback):
        def _sync(self, trainer) -> None:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize(trainer.strategy.root_device)

        def on_train_batch_start(self, trainer, *args) -> None:
            self._sync(trainer)
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, *args) -> None:
            self._sync(trainer)
            times.append(time.perf_counter() - self.start)

    trainer = L.Trainer(
        accelerator=options.accelerator, devices=options.devices, num_nodes=options.num_nodes,
        strategy=options.strategy, precision=options.precision, max_steps=options.steps,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[StepTimer()], default_root_dir=str(workdir),
    )
    trainer.fit(module, data)
    weights = trained_weights(module)
    digests = [digest(weights)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        digests = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(digests, digest(weights))
        torch.distributed.barrier()
    if trainer.is_global_zero:
        if options.compare:
            torch.save(weights, Path(options.out).with_name("weights.pt"))
        measured = times[options.warmup :] or times
        memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        Path(options.out).write_text(json.dumps({
            "median_s": statistics.median(measured), "steps": len(times), "optimizer_steps": trainer.global_step,
            "identical": len(set(digests)) == 1, "ranks": len(digests), "max_memory_gib": memory,
        }))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Skip interpreter teardown: with some backends a communication thread still running there
    # aborts the process ("terminate called without an active exception") after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_cell(options: argparse.Namespace, algorithm: str, strategy: str, workdir: Path, port: int) -> dict:
    out = workdir / f"{algorithm}-{strategy}" / "result.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, str(Path(__file__).resolve()), "--worker", "--algorithm", algorithm, "--strategy", strategy,
        "--devices", str(options.devices), "--num_nodes", str(options.num_nodes), "--accelerator", options.accelerator,
        "--precision", options.precision, "--steps", str(options.steps), "--warmup", str(options.warmup), "--out", str(out),
        "--micro_batch_size", str(options.micro_batch_size),
    ] + (["--tiny"] if options.tiny else []) + (["--compare"] if options.compare else [])
    env = {
        **os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1",
        "MASTER_PORT": str(port),  # cells may run side by side (--parallel)
    }
    start = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=out.parent, env=env, capture_output=True, text=True, timeout=options.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {options.timeout} s (hang?)"}
    if result.returncode != 0 or not out.exists():
        (out.parent / "log.txt").write_text(result.stdout + result.stderr)
        lines = [line for line in (result.stderr or result.stdout).strip().splitlines() if line.strip()]
        errors = [line for line in lines if "Error" in line] or lines  # the exception, not a teardown warning
        return {"error": (errors[-1] if errors else f"exit {result.returncode}")[:200], "log": str(out.parent / "log.txt")}
    return {**json.loads(out.read_text()), "wall_s": time.perf_counter() - start}


def weight_gap(workdir: Path, algorithm: str, reference: str, strategy: str) -> float | None:
    import torch

    paths = [workdir / f"{algorithm}-{name}" / "weights.pt" for name in (reference, strategy)]
    if not all(path.exists() for path in paths):
        return None
    first, other = (torch.load(path) for path in paths)
    return max(float((first[name] - other[name]).abs().max()) for name in first)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num_nodes", type=int, default=1)
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"])
    parser.add_argument("--algorithms", nargs="+", default=ALGORITHMS, choices=ALGORITHMS)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--precision", default="32-true", help="Lightning precision; the full-size model is built in bf16 either way")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batches: a CPU smoke run")
    parser.add_argument("--steps", type=int, default=None, help="training batches per cell (default 8, tiny 4)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--micro_batch_size", type=int, default=64, help="rows per backward of the on-policy updates")
    parser.add_argument("--compare", action="store_true",
                        help="also report each cell's largest weight difference to the first strategy's (same seed)")
    parser.add_argument("--parallel", type=int, default=1, help="cells run side by side (for correctness runs, not timings)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    options.steps = options.steps or (4 if options.tiny else 8)
    if options.worker:
        worker(options)
        return 0

    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="grape-multi-gpu-"))
    print(f"{options.devices} device(s) x {options.num_nodes} node(s), {'tiny' if options.tiny else 'Qwen2.5-0.5B-shaped'} "
          f"model, {options.steps} steps per cell (median after {options.warmup}); logs in {workdir}", flush=True)
    header = f"{'algorithm':<20}" + "".join(f"{s:>24}" for s in options.strategies)
    cells = [(algorithm, strategy) for algorithm in options.algorithms for strategy in options.strategies]
    table: dict[tuple[str, str], str] = {}
    failures = 0
    with ThreadPoolExecutor(max_workers=options.parallel) as pool:
        futures = [pool.submit(run_cell, options, a, s, workdir, 29500 + 11 * i) for i, (a, s) in enumerate(cells)]
        for (algorithm, strategy), future in zip(cells, futures):  # in order, each as soon as it is done
            result = future.result()
            if "error" in result:
                failures += 1
                table[algorithm, strategy] = "FAILED"
                print(f"  {algorithm} / {strategy}: {result['error']} ({result.get('log', '')})", flush=True)
                continue
            failures += not result["identical"]
            same = "same" if result["identical"] else "DIFFER"
            gap = weight_gap(workdir, algorithm, options.strategies[0], strategy) if options.compare else None
            table[algorithm, strategy] = f"{result['median_s']:.3f} s ({same if gap is None else f'{gap:.1e}'})"
            print(f"  {algorithm} / {strategy}: median {result['median_s']:.3f} s over {result['steps']} steps, "
                  f"{result['optimizer_steps']} optimizer steps, weights {same} on {result['ranks']} rank(s), "
                  f"peak {result['max_memory_gib']:.1f} GiB"
                  + ("" if gap is None else f", max |w - w[{options.strategies[0]}]| {gap:.2e}"), flush=True)
    rows = [f"{a:<20}" + "".join(f"{table[a, s]:>24}" for s in options.strategies) for a in options.algorithms]
    legend = f"largest weight difference to {options.strategies[0]}" if options.compare else "weights across ranks"
    print(f"\nmedian step time ({legend})\n" + header + "\n" + "\n".join(rows), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
