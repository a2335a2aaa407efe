"""Two CPU processes under DDP (gloo) optimise the loss of the global batch: GRPO and DPO take the
same steps, with the same logged losses, as one process whose batch is both ranks' batches
together, and both ranks end with identical weights. The same holds for GRPO and SFT sharded
with FSDP2 (``--trainer.strategy fsdp2``; Lightning's FSDP1 ``fsdp`` does not run on CPU), with
generation gathering the parameters once (no rank waits for another that stopped decoding), also
for a model whose input and output embeddings share one matrix (``grpo_tied``).

GRPO samples: to compare updates, every setup samples the same global rollout (the generator
seeded by the step alone, all prompts of the step) and each rank trains on its share of whole
groups. The setup makes the per-rank and global normalisations differ: token aggregation over
responses of unequal lengths, unscorable rewards on some rows, reward scaling by the batch std.

PPO (under DDP) adds global statistics of its own: reward scaling by the batch std, advantage
whitening, the adaptive KL coefficient, and a value model whose state is compared too.

DAPO (GRPO with dynamic sampling) samples the same global rollout in every round (seeded by step
and round, whole groups per rank) and drops tied groups from the loss (``filter_tied_groups``): the
ranks keep different numbers of informative groups (tracked and checked) and top up with different
tied groups, run the same rounds, and train, as one process does, on every informative group of
the global rollouts; the round statistics are global sums. Under FSDP2 too, where every round's
generation gathers the parameters on every rank.

REINFORCE++ whitens per-token advantages over every rank's tokens; GRPO with the sampler/trainer
mismatch correction (``grpo_tis``, the sampler's log-probs perturbed the same way in every setup)
truncates per-token weights and logs the mismatch's global sums and maxima.

REINFORCE, rejection sampling, GRAPE, TRPO and on-policy distillation run the same comparison with the ranks holding different
numbers of rows in the loss (13 and 12 valid rewards with micro-batches of 4; different numbers
of kept responses; GRAPE's off-policy responses for some prompts only, a judged rubric item weighted
by its running agreement with the verified one, and the per-item statistics; distillation mixing in the
task reward, so only responses with a valid reward train, with a discounted KL return-to-go), where the update loop
pads the shorter rank with zero-weighted passes so the backward all-reduces pair up.

Run by the tests as ``python -m tests.distributed.test_ddp_equivalence <algorithm,algorithm,...> <devices> <out_dir> <ddp|fsdp2>``, several algorithms a launch.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch

from grape_lightning.rewards import RewardFunction

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_PROMPTS = 8  # per GRPO step: 4 per rank with two ranks
GROUP_SIZE = 4
STEPS = 3
EPOCHS = {"gspo": 2, "cispo": 2}  # passes over each rollout batch, where more than one


def _spec(algorithm: str):
    from tests.conftest import TINY_CONFIG, tiny_spec

    tied = algorithm.endswith("_tied")  # input and output embeddings share one matrix
    return tiny_spec(dtype="float64", config={**TINY_CONFIG, "tie_word_embeddings": tied})


def _setup(algorithm: str, devices: int):
    from grape_lightning.algorithms import (
        AdvantageConfig, CISPOModule, DPOModule, DynamicSamplingConfig, GRAPEModule, GRPOModule, GSPOModule, MismatchCorrection,
        OffPolicyConfig, OnPolicyDistillationModule, OptimizerConfig, REINFORCEModule, RejectionSamplingModule, SFTModule,
        SurrogateConfig, UpdateConfig,
    )
    from grape_lightning.algorithms.on_policy import derive_seed
    from grape_lightning.data import PreferenceDataModule, SFTDataModule
    from grape_lightning.data.tasks import ArithmeticTask
    from grape_lightning.rewards import RewardFunction
    from grape_lightning.rollout import RolloutDataModule, SamplingParams
    from grape_lightning.rollout.datamodule import collate_prompts
    from grape_lightning.rollout.dynamic_sampling import informative_groups

    spec = _spec(algorithm)
    optimizer = OptimizerConfig(lr=1e-2)
    if algorithm == "sft":
        module = SFTModule(spec, optimizer=optimizer)
        return module, SFTDataModule(task=ArithmeticTask(num_train=96, num_val=4), max_length=16, batch_size=8 // devices)
    if algorithm == "dpo":
        module = DPOModule(spec, optimizer=optimizer, beta=0.5, sft_weight=0.5)  # NLL: a token mean over ranks
        data = PreferenceDataModule(task=ArithmeticTask(num_train=96, num_val=4), max_length=24, batch_size=8 // devices)
        return module, data

    class LengthParityWithGaps(RewardFunction):
        """1 for responses of odd length; every fifth response cannot be scored."""

        def __call__(self, prompts, responses, metadata):
            return [None if i % 5 == 0 else float(len(r) % 2) for i, r in enumerate(responses)]

    from grape_lightning.algorithms.ppo import PPOModule

    from grape_lightning.algorithms.trpo import TRPOModule

    base = {
        "ppo": PPOModule, "reinforce": REINFORCEModule, "reinforce_pp": REINFORCEModule, "rejection_sampling": RejectionSamplingModule,
        "grape": GRAPEModule, "trpo": TRPOModule, "gspo": GSPOModule, "cispo": CISPOModule, "distill": OnPolicyDistillationModule,
    }

    class SameGlobalRollout(base.get(algorithm, GRPOModule)):
        """Samples the step's global rollout (the same in every setup); trains on this rank's groups."""

        def setup(self, stage: str) -> None:
            data = self.trainer.datamodule
            self.global_items = data.train_items[:GLOBAL_PROMPTS]
            self.all_items = data.train_items
            self.kept_per_step: list[int] = []

        def sample_round(self, batch, sampling, round_number):
            """Dynamic sampling's rounds: round r of step s samples the global prompts of window
            s (rounds + 1) + r, seeded by (step, round); this rank's share of whole groups."""
            window = self.global_step * (DAPO_ROUNDS + 1) + round_number
            items = self.all_items[window * GLOBAL_PROMPTS : (window + 1) * GLOBAL_PROMPTS]
            generator = torch.Generator().manual_seed(derive_seed(self.seed, self.global_step, round_number))
            rollout = self.collector.sample(self, collate_prompts(items, GROUP_SIZE), sampling, generator)
            world, rank = self.trainer.world_size, self.global_rank
            rows = (rollout.groups % world == rank).nonzero().flatten()
            return rollout.select(rows, groups=rollout.groups[rows] // world)

        def _generator(self) -> torch.Generator:
            return torch.Generator().manual_seed(derive_seed(self.seed, self.global_step))

        def collect_rollout(self, batch, sampling=None):
            if sampling is not None:  # greedy evaluation: the rank's own prompts
                return super().collect_rollout(batch, sampling)
            if self.dynamic_sampling is not None:  # the rounds sample global rollouts (sample_round)
                rollout = super().collect_rollout(batch)
                self.kept_per_step.append(int(informative_groups(rollout.rewards, rollout.groups, rollout.valid).sum()))
                return rollout
            rollout = super().collect_rollout(collate_prompts(self.global_items, GROUP_SIZE))
            if algorithm == "grpo_tis":  # a sampler that differs from the trainer (on CPU in float64 they agree)
                shift = 0.8 * torch.sin(3.0 * rollout.old_logprobs + torch.arange(rollout.old_logprobs.shape[1]))
                rollout.sampling_logprobs = torch.where(rollout.response_mask, rollout.old_logprobs - shift, 0.0)
            world, rank = self.trainer.world_size, self.global_rank
            rows = (rollout.groups % world == rank).nonzero().flatten()
            return rollout.select(rows, groups=rollout.groups[rows] // world)

    common = dict(sampling=SamplingParams(max_new_tokens=6), optimizer=optimizer, update=UpdateConfig(micro_batch_size=4, max_grad_norm=0.5))
    rewards = [LengthParityWithGaps()]
    if algorithm == "ppo":  # batch reward scaling, whitened advantages, adaptive KL: all global statistics
        module = SameGlobalRollout(
            spec, rewards=rewards, value_model="separate", kl_coef=0.1, kl_target=0.5, reward_scaling="batch", aggregation="token", **common,
        )
    elif algorithm == "reinforce":  # a global batch mean, a KL folded into the reward
        module = SameGlobalRollout(spec, rewards=rewards, advantage=AdvantageConfig("batch_mean", "batch"), kl_coef=0.1, **common)
    elif algorithm == "reinforce_pp":  # per-token KL reward-to-go, advantages whitened over every rank's tokens
        module = SameGlobalRollout(
            spec, rewards=rewards, advantage=AdvantageConfig("mean", "whiten"), kl_coef=0.1, kl_reward="token", **common,
        )
    elif algorithm == "grpo_tis":  # truncated importance weights, the mismatch's global sums and maxima
        module = SameGlobalRollout(
            spec, rewards=rewards, advantage=AdvantageConfig("mean", "batch"), loss=SurrogateConfig(beta=0.1, aggregation="token"),
            mismatch=MismatchCorrection("tis", cap=1.5), **common,
        )
    elif algorithm == "trpo":  # token means over every rank's tokens: uneven token counts across ranks
        module = SameGlobalRollout(spec, rewards=rewards, sampling=common["sampling"], trust_region={"max_kl": 0.05}, update=UpdateConfig(micro_batch_size=4))
    elif algorithm in ("gspo", "cispo"):  # two passes over each rollout: the second's ratios (and clips) differ from 1
        clip = {"eps_low": 0.02, "eps_high": 0.03} if algorithm == "gspo" else {"eps_low": 0.2, "eps_high": 0.28}
        update = UpdateConfig(epochs=EPOCHS[algorithm], micro_batch_size=4, max_grad_norm=0.5)
        module = SameGlobalRollout(
            spec, rewards=rewards, advantage=AdvantageConfig("mean", "batch"), sampling=common["sampling"], optimizer=optimizer,
            update=update, **clip,
        )
    elif algorithm == "distill":  # another random tiny model as the teacher; the task reward mixed in (valid rows only)
        from tests.conftest import tiny_spec

        module = SameGlobalRollout(
            spec, teacher=tiny_spec(dtype="float64", init_seed=1), rewards=rewards, discount=0.5, reward_coef=0.5,
            advantage=AdvantageConfig("mean", "batch"), **common,
        )
    elif algorithm == "rejection_sampling":
        module = SameGlobalRollout(spec, rewards=rewards, keep_top_k=2, reward_threshold=1.0, **common)
    elif algorithm == "grape":  # rubric weighted by reliability, leave-one-out, off-policy responses for some prompts
        from grape_lightning.rewards.critics import CallableCritic

        Path("rubric.yaml").write_text(GRAPE_RUBRIC)
        with open("responses.jsonl", "w") as responses:
            for prompt in train_prompts(GLOBAL_PROMPTS)[::3]:  # prompts 0, 3 and 6: two on rank 0, one on rank 1
                responses.write(json.dumps({"prompt": prompt, "response": "12"}) + "\n")
        module = SameGlobalRollout(
            spec, rubric="rubric.yaml", critics={"judge": CallableCritic("tests.distributed.test_ddp_equivalence:judged_parity")},
            advantage=AdvantageConfig("leave_one_out", "batch"), weighting={"mode": "reliability", "momentum": 0.5},
            off_policy=OffPolicyConfig(responses_file="responses.jsonl", treatment="all"),
            loss=SurrogateConfig(beta=0.1, aggregation="token"), **common,
        )
    elif algorithm == "dapo":
        # informative only on the first half of each window's prompts (two of each rank's four):
        # at most as many informative groups over the rounds as the batch holds, so no process
        # truncates and the kept groups are those of one process on the global rollouts
        prompts = train_prompts(64)
        assert len(set(prompts)) == len(prompts)
        marked = {prompts[w * GLOBAL_PROMPTS + g] for w in range(STEPS * (DAPO_ROUNDS + 1)) for g in range(GLOBAL_PROMPTS // 2)}
        module = SameGlobalRollout(
            spec, rewards=[ParityOnMarkedPrompts(marked)], advantage=AdvantageConfig("mean", "group"),
            loss=SurrogateConfig(beta=0.1, eps_high=0.28, aggregation="token", filter_tied_groups=True),
            dynamic_sampling=DynamicSamplingConfig(max_rounds=DAPO_ROUNDS), **common,
        )
        # the loader's batch sets the number of groups wanted: the global batch, split over the ranks
        return module, RolloutDataModule(task=ArithmeticTask(num_train=64, num_val=4), group_size=GROUP_SIZE, batch_size=GLOBAL_PROMPTS // devices)
    else:
        module = SameGlobalRollout(
            spec, rewards=rewards, advantage=AdvantageConfig("mean", "batch"), loss=SurrogateConfig(beta=0.1, aggregation="token"), **common,
        )
    data = RolloutDataModule(task=ArithmeticTask(num_train=64, num_val=4), group_size=GROUP_SIZE, batch_size=4)
    return module, data


DAPO_ROUNDS = 1  # extra generation rounds of dynamic sampling per step


class ParityOnMarkedPrompts(RewardFunction):
    """1 for responses of odd length to the marked prompts; 1 for every response to the others
    (their groups tie)."""

    def __init__(self, marked: set[str]) -> None:
        super().__init__()
        self.marked = marked

    def __call__(self, prompts, responses, metadata):
        return [float(len(r) % 2) if p in self.marked else 1.0 for p, r in zip(prompts, responses)]


GRAPE_RUBRIC = """\
default_category: math
categories:
  math:
    - {name: parity, weight: 1.0, kind: verifiable, check: python, function: "tests.distributed.test_ddp_equivalence:parity_with_gaps"}
    - {name: judged_parity, weight: 0.5, kind: judged, critic: judge, question: "Is the length of the response odd?"}
"""
GRAPE_ITEM_METRICS = tuple(
    f"rubric/math/{item}/{name}" for item in ("parity", "judged_parity")
    for name in ("failures", "score", "confidence", "spread", "omega", "reward_share", "advantage_share")
) + tuple(f"rubric/math/judged_parity/{name}" for name in ("agreement", "calibration_error", "reliability")) + ("critic_failures",)
"""GRAPE's per-item statistics, sums over the processes (the reliability estimate, which weights
the judged item from the second step on, too)."""


def judged_parity(request):
    """A critic of the response's parity that is wrong on about a quarter of the responses, with
    confidences spread over [0, 1], and fails on about one in seven."""
    code = zlib.crc32(f"{request.prompt}|{request.response}|judge".encode())
    if code % 7 == 0:
        return None
    parity = float(len(request.response) % 2)
    return (parity if code % 4 else 1.0 - parity), (code % 97) / 96, ""


def parity_with_gaps(prompt, response, metadata):
    """1 for responses of odd length; about every fifth response cannot be scored."""
    return None if zlib.crc32(f"{prompt}|{response}".encode()) % 5 == 0 else float(len(response) % 2)


def train_prompts(count):
    """The first ``count`` training prompts of the task every setup samples from."""
    from grape_lightning.data.tasks import ArithmeticTask

    return [example.prompt for example in ArithmeticTask(num_train=64, num_val=4).examples("train")][:count]


def algorithm_of(module) -> str:
    return "ppo" if hasattr(module, "value_model") and module.value_model is not None else "other"


class RecordLosses(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, *args) -> None:
        metrics = trainer.callback_metrics
        if "train/loss" in metrics:
            self.losses.append(float(metrics["train/loss"]))
        elif "train/surrogate_improvement" in metrics:  # TRPO has no loss: the gain of its step
            self.losses.append(float(metrics["train/surrogate_improvement"]))
        else:
            self.losses.append(float(metrics["train/policy_loss"] + metrics["train/value_loss"]))

    def on_train_end(self, trainer, module) -> None:
        state = {  # full tensors also under FSDP2 (a collective: every rank gathers)
            name: (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()
            for name, tensor in (module.state_dict() if algorithm_of(module) == "ppo" else module.policy.state_dict()).items()
        }
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items()}
        kept = getattr(module, "kept_per_step", None)
        torch.save({"losses": self.losses, "policy": state, "metrics": metrics, "kept": kept}, self.out / f"rank{trainer.global_rank}.pt")


def main(algorithms: str, devices: int, out: str, strategy: str) -> None:
    """Trains each of the comma-separated ``algorithms`` in turn in these processes (one launch
    for many: most of a launch is starting Python and importing), each from the same seed, its
    ranks' records under ``out/<algorithm>``."""
    import grape_lightning  # noqa: F401  registers the strategy name fsdp2

    for algorithm in algorithms.split(","):
        L.seed_everything(0)
        module, data = _setup(algorithm, devices)
        (Path(out) / algorithm).mkdir(parents=True, exist_ok=True)
        trainer = L.Trainer(
            accelerator="cpu", devices=devices, strategy="auto" if devices == 1 else strategy, max_steps=STEPS,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=0, num_sanity_val_steps=0, callbacks=[RecordLosses(Path(out) / algorithm)],
        )
        trainer.fit(module, data)


def _run(algorithms: list[str], devices: int, out: Path, strategy: str = "ddp") -> dict[str, list[dict]]:
    """{algorithm: its ranks' records} of one launch of :func:`main` on ``devices`` processes."""
    out.mkdir(parents=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "tests.distributed.test_ddp_equivalence", ",".join(algorithms), str(devices), str(out), strategy]
    result = subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=120 + 60 * len(algorithms))
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return {algorithm: [torch.load(out / algorithm / f"rank{rank}.pt") for rank in range(devices)] for algorithm in algorithms}


CASES = [
    ("grpo", "ddp"), ("grape", "ddp"), ("reinforce", "ddp"), ("rejection_sampling", "ddp"), ("ppo", "ddp"), ("trpo", "ddp"),
    ("dpo", "ddp"), ("gspo", "ddp"), ("cispo", "ddp"), ("dapo", "ddp"), ("reinforce_pp", "ddp"), ("grpo_tis", "ddp"),
    ("distill", "ddp"), ("grpo", "fsdp2"), ("grpo_tied", "fsdp2"), ("sft", "fsdp2"), ("dapo", "fsdp2"),
]


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
    """(algorithm, strategy) -> (the one-process records, the two ranks' records). The cases this
    session selected run together: every one-process reference in one launch, and the two-process
    runs in one launch per strategy."""
    selected = sorted({
        tuple(item.callspec.params[name] for name in ("algorithm", "strategy"))
        for item in request.session.items
        if item.module is request.module and getattr(item, "originalname", "") == "test_two_processes_take_the_steps_of_one_process_on_the_global_batch"
    })
    root = tmp_path_factory.mktemp("equivalence")
    cache: dict = {}

    def get(algorithm: str, strategy: str) -> tuple[dict, list[dict]]:
        if "single" not in cache:
            cache["single"] = _run(sorted({a for a, _ in selected}), 1, root / "single")
        if strategy not in cache:
            cache[strategy] = _run([a for a, s in selected if s == strategy], 2, root / strategy, strategy)
        (single,) = cache["single"][algorithm]
        return single, cache[strategy][algorithm]

    return get


@pytest.mark.parametrize("algorithm, strategy", CASES)
def test_two_processes_take_the_steps_of_one_process_on_the_global_batch(algorithm, strategy, trained):
    single, ranks = trained(algorithm, strategy)
    for name, tensor in ranks[0]["policy"].items():
        assert torch.equal(tensor, ranks[1]["policy"][name]), name  # bit-identical across ranks
    assert ranks[0]["losses"] == ranks[1]["losses"]
    losses = torch.tensor([single["losses"], ranks[0]["losses"]], dtype=torch.float64)
    loss_gap = float((losses[0] - losses[1]).abs().max())
    weight_gap = max(float((single["policy"][n] - t).abs().max()) for n, t in ranks[0]["policy"].items())
    moved = max(float((single["policy"]["policy." * (algorithm == "ppo") + n] - t).abs().max()) for n, t in _initial_policy(algorithm).items())
    print(f"\n{algorithm} / {strategy}: losses 1 process {single['losses']} / 2 processes {ranks[0]['losses']}; "
          f"max loss gap {loss_gap:.2e}, max weight gap {weight_gap:.2e} (weights moved up to {moved:.2e})")
    assert len(single["losses"]) == math.ceil(STEPS / EPOCHS.get(algorithm, 1))  # one loss logged per rollout batch
    assert loss_gap < 1e-10
    assert weight_gap < 1e-10
    assert moved > 1e-3
    checked = {
        "dpo": ("train/rewards/accuracies", "train/rewards/margins", "train/sft_nll"),
        "grpo": ("train/kl", "train/policy_loss", "train/tied_groups", "train/advantage_abs_mean"),
        "grpo_tied": ("train/kl", "train/policy_loss"),
        "grape": ("train/kl", "train/policy_loss", "train/advantage_abs_mean", "train/entropy") + GRAPE_ITEM_METRICS,
        "reinforce": ("train/kl", "train/policy_loss", "train/advantage_abs_mean", "train/entropy", "train/tied_groups",
                      "train/group_reward_std"),
        "reinforce_pp": ("train/kl", "train/policy_loss", "train/advantage_abs_mean", "train/entropy"),
        "grpo_tis": ("train/kl", "train/policy_loss", "train/mismatch_kl", "train/mismatch_ratio_max", "train/mismatch_abs_max",
                     "train/mismatch_corrected"),
        "distill": ("train/reverse_kl", "train/policy_loss", "train/advantage_abs_mean", "train/entropy"),
        "gspo": ("train/policy_loss", "train/tied_groups", "train/advantage_abs_mean", "train/entropy", "train/clip_fraction_high", "train/ratio_mean"),
        "dapo": ("train/kl", "train/policy_loss", "train/entropy", "train/clip_fraction_high") + tuple(
            f"train/dynamic_sampling/{name}" for name in ("rounds", "prompts_generated", "kept_groups", "filled_groups", "sampled_reward")),
        "cispo": ("train/policy_loss", "train/tied_groups", "train/advantage_abs_mean", "train/entropy", "train/clip_fraction_high", "train/ratio_mean"),
        "rejection_sampling": ("train/nll", "train/kept_fraction", "train/kept_reward", "train/tied_groups", "train/group_reward_std"),
        "trpo": ("train/kl_after_step", "train/surrogate_improvement", "train/cg_residual", "train/advantage_abs_mean",
                 "train/tied_groups", "train/group_reward_std"),
        "ppo": ("train/kl", "train/kl_coef", "train/reward_scale", "train/advantage_std", "train/value_loss"),
    }
    for name in checked.get(algorithm, ()):
        assert abs(single["metrics"][name] - ranks[0]["metrics"][name]) < 1e-10, name
    if algorithm == "grape":  # logged by each rank without a reduction of Lightning's: the same global values on both
        assert all(ranks[0]["metrics"][name] == ranks[1]["metrics"][name] for name in GRAPE_ITEM_METRICS)
        print("grape: " + ", ".join(f"{name.removeprefix('rubric/math/')} {single['metrics'][name]:.4f}" for name in GRAPE_ITEM_METRICS))
    if algorithm == "dapo":
        kept = [ranks[0]["kept"], ranks[1]["kept"]]
        print(f"dapo: informative groups kept per step: 1 process {single['kept']}, ranks {kept[0]} / {kept[1]}")
        assert kept[0] != kept[1]  # the ranks trained on different numbers of groups
        assert [a + b for a, b in zip(*kept)] == single["kept"]
        assert ranks[0]["metrics"]["train/dynamic_sampling/rounds"] == 1 + DAPO_ROUNDS


def _initial_policy(algorithm: str) -> dict:
    from grape_lightning.models.loading import load_causal_lm, load_tokenizer

    spec = _spec(algorithm)
    return load_causal_lm(spec, load_tokenizer(spec)).state_dict()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
