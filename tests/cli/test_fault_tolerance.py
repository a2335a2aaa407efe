"""Fault tolerance through the real ``grape`` command: a GRPO run killed with SIGKILL mid-training
and restarted with the same command (``--ckpt_path last``) ends with the weights and metrics of
an uninterrupted run; a crash in the middle of a checkpoint write leaves the previous
``last.ckpt`` intact and loadable."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch
import yaml

from grape_lightning.checkpointing import AtomicCheckpointIO

ROOT = Path(__file__).resolve().parents[2]
MAX_STEPS = 9


class Pace(L.Callback):
    """Sleeps after every training batch, so a test can kill the run between two checkpoints."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, *args) -> None:
        time.sleep(self.seconds)


class Record(L.Callback):
    """Writes the step training started from, and at the end the policy and the logged metrics."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def on_train_start(self, trainer, module) -> None:
        with open(self.directory / "starts.txt", "a") as handle:
            handle.write(f"{trainer.global_step}\n")

    def on_train_end(self, trainer, module) -> None:
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        state = {name: tensor.detach().clone() for name, tensor in module.policy.state_dict().items()}
        torch.save({"step": trainer.global_step, "metrics": metrics, "policy": state}, self.directory / "end.pt")


def _command(run: Path, pace: float) -> list[str]:
    override = {
        "trainer": {
            "max_steps": MAX_STEPS, "val_check_interval": 1000, "logger": False, "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                    "dirpath": str(run / "checkpoints"), "every_n_train_steps": 3, "save_last": True, "save_top_k": -1,
                }},
                {"class_path": "tests.cli.test_fault_tolerance.Pace", "init_args": {"seconds": pace}},
                {"class_path": "tests.cli.test_fault_tolerance.Record", "init_args": {"directory": str(run / "record")}},
            ],
        },
        "model": {"init_args": {"loss": {"beta": 0.04}}},  # a KL term, so the reference takes part
        "data": {"init_args": {"task": {"init_args": {"num_train": 64, "num_val": 8}}, "batch_size": 4, "group_size": 4}},
    }
    run.mkdir(parents=True, exist_ok=True)
    (run / "override.yaml").write_text(yaml.safe_dump(override))
    return [
        sys.executable, "-m", "grape_lightning.cli", "fit",
        "--config", str(ROOT / "configs/grpo.yaml"), "--config", str(run / "override.yaml"), "--ckpt_path", "last",
    ]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _finish(command: list[str], cwd: Path) -> None:
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The record of the run every interrupted one must end up identical to."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    _finish(_command(workdir / "run", pace=0.0), workdir)
    return workdir / "run"


def _assert_same_end(run: Path, uninterrupted: Path) -> None:
    ours = torch.load(run / "record" / "end.pt")
    reference = torch.load(uninterrupted / "record" / "end.pt")
    assert ours["step"] == reference["step"] == MAX_STEPS
    timings = {name for name in reference["metrics"] if name.endswith("_per_s")}
    assert {k: v for k, v in ours["metrics"].items() if k not in timings} == {
        k: v for k, v in reference["metrics"].items() if k not in timings
    }
    for name, tensor in reference["policy"].items():
        assert torch.equal(ours["policy"][name], tensor), name


def test_sigkilled_run_resumes_with_the_same_command_and_ends_as_an_uninterrupted_run(tmp_path, uninterrupted):

    run = tmp_path / "killed"
    command = _command(run, pace=0.5)
    process = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run / "checkpoints" / "epoch=0-step=3.ckpt").exists():  # last.ckpt is written right after
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.05)
        time.sleep(0.75)  # into step 4 or 5: past the checkpoint, before the next one
        assert process.poll() is None
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    assert not (run / "record" / "end.pt").exists()  # killed mid-training
    killed_at = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))

    _finish(command, tmp_path)  # the same command: --ckpt_path last finds the checkpoint

    starts = [int(line) for line in (run / "record" / "starts.txt").read_text().split()]
    ours = torch.load(run / "record" / "end.pt")
    reference = torch.load(uninterrupted / "record" / "end.pt")
    print(f"\ncheckpoints at the kill: {killed_at}; training started at steps {starts}; "
          f"final step {ours['step']} (uninterrupted {reference['step']})")
    for name in ("train/reward", "train/loss", "train/kl"):
        print(f"  {name}: resumed {ours['metrics'][name]:.6f}  uninterrupted {reference['metrics'][name]:.6f}")
    assert starts == [0, 3]
    _assert_same_end(run, uninterrupted)  # bit-identical: sampling seeds derive from (seed, rank, step)


def _wait_for_first_checkpoint(process: subprocess.Popen, run: Path) -> None:
    deadline = time.monotonic() + 240
    while not (run / "checkpoints" / "epoch=0-step=3.ckpt").exists():
        assert process.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within the time limit"
        time.sleep(0.05)
    time.sleep(0.75)  # into step 4 or 5: past the checkpoint, before the next one


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_exits_nonzero_and_resume_ends_as_an_uninterrupted_run(signum, status, tmp_path, uninterrupted):
    """SIGTERM (SLURM, Kubernetes) or Ctrl-C: training stops at the end of the batch, ``last.ckpt`` of
    that step is written, the exit status is 128 + the signal, and ``--ckpt_path last`` goes on."""
    run = tmp_path / "run"
    command = _command(run, pace=0.5)
    with open(tmp_path / "output.txt", "w") as output:
        process = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=output, stderr=subprocess.STDOUT)
        try:
            _wait_for_first_checkpoint(process, run)
            os.kill(process.pid, signum)
            assert process.wait(timeout=120) == status
        finally:
            if process.poll() is None:
                process.kill()
    printed = (tmp_path / "output.txt").read_text()
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    print(f"\n{signal.Signals(signum).name}: exit {status}, last.ckpt at step {stopped_at}")
    assert 3 < stopped_at < MAX_STEPS  # written by the signal, not by the periodic checkpoint at step 3
    assert f"{signal.Signals(signum).name} at step {stopped_at}: checkpoint written to {run / 'checkpoints' / 'last.ckpt'}" in printed
    assert not (run / "record" / "end.pt").exists()

    _finish(command, tmp_path)
    assert [int(line) for line in (run / "record" / "starts.txt").read_text().split()] == [0, stopped_at]
    _assert_same_end(run, uninterrupted)


FAILING_REWARD = """
import os
from grape_lightning.rewards import NumericMatch

class FailingNumericMatch(NumericMatch):
    \"\"\"NumericMatch that raises on its FAIL_ON_CALL-th call (a user's reward with a bug).\"\"\"
    calls = 0

    def __call__(self, prompts, responses, metadata):
        FailingNumericMatch.calls += 1
        if str(FailingNumericMatch.calls) == os.environ.get("FAIL_ON_CALL"):
            raise ValueError(f"cannot parse {responses[0]!r}")
        return super().__call__(prompts, responses, metadata)
"""


def test_a_raising_reward_beside_the_config_ends_with_its_traceback_and_a_resumable_checkpoint(tmp_path, uninterrupted):
    """``my_rewards.py`` beside the config loads by class path without PYTHONPATH; when it raises,
    the run ends with the user's traceback and ``last.ckpt`` of the last completed step, from which
    the same command plus ``--ckpt_path last`` (with the bug fixed) ends as an uninterrupted run,
    and ``grape export`` from another directory exports it."""
    run = tmp_path / "run"
    command = _command(run, pace=0.0)
    (run / "my_rewards.py").write_text(FAILING_REWARD)
    override = yaml.safe_load((run / "override.yaml").read_text())
    override["model"]["init_args"]["rewards"] = [
        {"class_path": "my_rewards.FailingNumericMatch", "init_args": {"name": "numeric_match"}}
    ]
    (run / "override.yaml").write_text(yaml.safe_dump(override))
    # calls: 1 for the initial validation, then one per step: the 6th is step 5's, after step 4 completed
    failing = subprocess.run(command, cwd=tmp_path, env={**ENV, "FAIL_ON_CALL": "6"}, capture_output=True, text=True, timeout=300)
    printed = failing.stdout + failing.stderr
    assert failing.returncode == 1, printed[-3000:]
    assert f'{run / "my_rewards.py"}", line' in printed and "ValueError: cannot parse" in printed
    assert f"ValueError at step 4: checkpoint written to {run / 'checkpoints' / 'last.ckpt'}" in printed
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4

    _finish(command, tmp_path)
    assert [int(line) for line in (run / "record" / "starts.txt").read_text().split()] == [0, 4]
    _assert_same_end(run, uninterrupted)

    # grape export, from another directory, rebuilds the module, whose reward is my_rewards.py's:
    # the checkpoint recorded the config's directory, which grape fit had put on sys.path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    export = [sys.executable, "-m", "grape_lightning.cli", "export", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
              "--output_dir", "exported"]
    exported = subprocess.run(export, cwd=elsewhere, env=ENV, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (elsewhere / "exported" / "config.json").is_file() and "my_rewards" not in sys.modules


def _state(value: float) -> dict:
    return {"state_dict": {"weight": torch.full((64, 64), value)}, "global_step": int(value)}


def test_a_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(_state(1.0), path)

    def torn_write(obj, handle, *args, **kwargs):  # half a file, then the process "dies"
        handle.write(b"PK\x03\x04 partial checkpoint bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_write)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint(_state(2.0), path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no partial file left behind
    assert io.load_checkpoint(path)["global_step"] == 1


CRASH_MID_WRITE = """
import os, signal, sys, torch
from grape_lightning.checkpointing import AtomicCheckpointIO
real_save = torch.save
def save_then_die(obj, handle, *args, **kwargs):
    real_save(obj, handle, *args, **kwargs)
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # after the bytes, before the rename
torch.save = save_then_die
AtomicCheckpointIO().save_checkpoint({"global_step": 2, "state_dict": {}}, sys.argv[1])
"""


def test_sigkill_between_write_and_rename_keeps_last_ckpt_and_resume_ignores_the_partial(tmp_path):
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "state_dict": {}}, path)
    result = subprocess.run([sys.executable, "-c", CRASH_MID_WRITE, str(path)], env=ENV, capture_output=True, timeout=120)
    assert result.returncode == -signal.SIGKILL
    partials = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert len(partials) == 1 and partials[0].startswith(".last.ckpt.partial-")  # a hidden leftover, never *.ckpt
    assert torch.load(path, weights_only=True)["global_step"] == 1
    # what ``ckpt_path="last"`` resumes from: the complete checkpoint, never the leftover
    found = ModelCheckpoint(dirpath=tmp_path)._find_last_checkpoints(None)
    assert found == {str(path)}


class RecordPrompts(L.Callback):
    """Appends the prompts each rank trained on (one line per rank and step)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def on_train_batch_end(self, trainer, module, *args) -> None:
        prompts = sorted({sample["prompt"] for sample in module.last_samples})
        with open(self.directory / f"prompts-rank{trainer.global_rank}.txt", "a") as handle:
            handle.write("\n".join(prompts) + "\n")


def _resize_command(run: Path, devices: int, batch_size: int, max_steps: int, strategy: str = "ddp") -> list[str]:
    override = {
        "trainer": {
            "max_steps": max_steps, "val_check_interval": 1000, "logger": False, "enable_progress_bar": False,
            "callbacks": [
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
                    "dirpath": str(run / "checkpoints"), "every_n_train_steps": 2, "save_last": True,
                }},
                {"class_path": "tests.cli.test_fault_tolerance.RecordPrompts", "init_args": {"directory": str(run / "record")}},
            ],
        },
        "data": {"init_args": {"task": {"init_args": {"num_train": 64, "num_val": 4}}, "batch_size": batch_size, "group_size": 2}},
    }
    (run / f"override-{devices}.yaml").write_text(yaml.safe_dump(override))
    return [
        sys.executable, "-m", "grape_lightning.cli", "fit", "--config", str(ROOT / "configs/grpo.yaml"),
        "--config", str(run / f"override-{devices}.yaml"), "--ckpt_path", "last",
        "--trainer.accelerator", "cpu", "--trainer.devices", str(devices), "--trainer.strategy", strategy if devices > 1 else "auto",
    ]


def _first_prompts(count: int) -> list[str]:
    """The first ``count`` prompts of epoch 0's shuffled order (what one process trains on first)."""
    from grape_lightning.data.tasks import ArithmeticTask
    from grape_lightning.models.loading import load_tokenizer
    from grape_lightning.rollout import RolloutDataModule

    data = RolloutDataModule(task=ArithmeticTask(digits=2, operators="+", num_train=64, num_val=4), batch_size=count)
    data.set_tokenizer(load_tokenizer("grape/tiny-addition-sft"))
    data.setup()
    return sorted(set(next(iter(data.train_dataloader()))["prompts"]))


@pytest.mark.parametrize("before, after, strategy", [(2, 1, "ddp"), (1, 2, "ddp"), (2, 1, "fsdp2")])
def test_a_run_resumes_on_another_number_of_processes_where_it_stopped(before, after, strategy, tmp_path):
    """The same command but ``--trainer.devices``: 2 prompts per process and step, so the global
    batch changes with the number of processes. 2 steps, then 2 more after the resume, which must
    train on the prompts that follow in the order, none twice, none skipped. Under FSDP2 the
    checkpoint of the sharded run is whole and resumes in one unsharded process."""
    run = tmp_path / "run"
    run.mkdir()
    _finish(_resize_command(run, before, 2, 2, strategy), tmp_path)
    _finish(_resize_command(run, after, 2, 4, strategy), tmp_path)
    trained = []
    for path in sorted((run / "record").glob("prompts-rank*.txt")):
        trained += [line for line in path.read_text().splitlines() if line]
    print(f"\n{before} -> {after} processes: {len(trained)} prompts trained, {len(set(trained))} distinct")
    assert len(trained) == 12 == len(set(trained))
    assert sorted(trained) == _first_prompts(12)
