"""One on-policy step of 64 prompts x 8 samples x 256 new tokens (GRPO, DAPO, GRAPE, PPO, GSPO, CISPO,
REINFORCE++, RLOO, on-policy distillation): step time
split into generation, scoring, log-probs and update, and peak memory; with ``--peer trl`` TRL's
GRPOTrainer (its default generation) on the same model, prompts, reward and settings, in the same
call.

    python scripts/bench_grpo.py --shape qwen2.5-0.5b --algorithms grpo dapo grape ppo gspo cispo --peer trl

DAPO is GRPO with configs/dapo.yaml's settings: clip-higher (eps_high 0.28), token aggregation,
no KL, dynamic sampling (up to 3 extra rounds of 64 fresh prompts while a group's rewards tie) and
the soft overlong punishment (L_max = the new tokens, L_cache = a quarter of them); its rows add
the generation rounds of each step (``rounds``) and the sample sets generated
(``prompts_generated``), since a step's time grows with them.

GRAPE scores each response with a two-item rubric: the text reward as a verifiable item and a
judged item from a rule-based critic (score and confidence from the text), so the step includes
the rubric's confidence-weighted aggregation but no judging model. PPO trains a value head on the
policy's trunk (one pass, GAE with gamma = lambda = 1), with its KL penalty off like the others.
REINFORCE++ (per-token KL reward-to-go, advantages whitened over the batch's tokens) and RLOO
(leave-one-out baseline, the sequence's KL in its reward) keep their KL to the reference, which
defines them: their step includes the reference's and pi_old's log-prob passes.
Distillation (``distill``) takes a teacher of the policy's shape (the same saved weights, so its
gradients are zero but its work is the same): the teacher's log-prob pass counts in ``logprobs_s``.

``--mismatch tis`` (or ``token_mask``, ``sequence_mask``) turns the sampler/trainer mismatch
correction on for GRPO, GRAPE, REINFORCE++ and RLOO: pi_old's log-probs are then recomputed by the
trainer, and each row reports the mismatch the step measured (``mismatch_kl``,
``mismatch_ratio_max``, ``mismatch_abs_max``, ``mismatch_corrected``), logged whenever both sets exist.

Settings on both sides: bf16 weights, prompts of 128 tokens, temperature 1, at most 256 new
tokens, group size 8, no KL term (TRL's default beta = 0), one optimizer step per rollout batch
(TRL: 64 completions per micro-batch x 8 accumulation steps = the 512 completions of one
generation), no gradient checkpointing (TRL's default turns it on; off here on both sides), a
reward computed from the response text (the share of even word ids). The first ``--warmup``
steps are left out (CUDA graph recording, allocator warm-up); the median of the rest is reported.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from bench_common import (
    QWEN25_SHAPES,
    benchmark_trainer,
    hf_step_timer,
    median,
    peak_memory_gib,
    profile_callback,
    random_text,
    reset_peak_memory,
    save_benchmark_model,
    synchronize,
    write_report,
)

from grape_lightning.algorithms import (
    AdvantageConfig,
    CISPOModule,
    DynamicSamplingConfig,
    GRAPEModule,
    GRPOModule,
    GSPOModule,
    MismatchCorrection,
    OnPolicyDistillationModule,
    OptimizerConfig,
    PPOModule,
    REINFORCEModule,
    SurrogateConfig,
    UpdateConfig,
)
from grape_lightning.rewards import OverlongPunishment, RewardFunction
from grape_lightning.rewards.critics import CallableCritic
from grape_lightning.rollout import RolloutDataModule, SamplingParams


def even_share(text: str) -> float:
    words = text.split()
    return sum(int(word[1:]) % 2 == 0 for word in words if word[1:].isdigit()) / max(len(words), 1)


class EvenWords(RewardFunction):
    """A cheap reward read from the text: the share of response words with an even id."""

    def __call__(self, prompts, responses, metadata):
        return [even_share(response) for response in responses]


def even_verifier(prompt, response, metadata):
    """GRAPE's verifiable item: the share of even word ids."""
    return even_share(response)


def short_words_critic(request):
    """GRAPE's judged item: the share of words with ids under 1000, surer the further from 1/2."""
    words = request.response.split()
    share = sum(len(word) <= 4 for word in words) / max(len(words), 1)
    return share, 0.5 + abs(share - 0.5), "share of short words"


RUBRIC = """\
default_category: text
categories:
  text:
    - {name: even, weight: 1.0, kind: verifiable, check: python, function: "bench_grpo:even_verifier"}
    - {name: short, weight: 0.5, kind: judged, critic: short_words, question: "Are the words short?"}
"""


def build_module(algorithm: str, spec, workdir: Path, args):
    common = {
        "sampling": SamplingParams(max_new_tokens=args.new, temperature=1.0),
        "optimizer": OptimizerConfig(lr=1e-6, weight_decay=0.0),
        "update": UpdateConfig(micro_batch_size=args.micro_batch),
    }
    mismatch = MismatchCorrection(args.mismatch)
    if algorithm == "grape":
        rubric = workdir / "rubric.yaml"
        rubric.write_text(RUBRIC)
        return GRAPEModule(spec, rubric=str(rubric), critics={"short_words": CallableCritic("bench_grpo:short_words_critic")},
                           loss=SurrogateConfig(beta=0.0), mismatch=mismatch, **common)
    builders = {
        "grpo": lambda: GRPOModule(spec, rewards=[EvenWords()], loss=SurrogateConfig(beta=0.0), mismatch=mismatch, **common),
        # configs/dapo.yaml's settings
        "dapo": lambda: GRPOModule(
            spec, rewards=[EvenWords(), OverlongPunishment(max_length=args.new, cache_length=max(args.new // 4, 1))],
            loss=SurrogateConfig(beta=0.0, eps_low=0.2, eps_high=0.28, aggregation="token"),
            dynamic_sampling=DynamicSamplingConfig(max_rounds=3), mismatch=mismatch, **common),
        "ppo": lambda: PPOModule(spec, rewards=[EvenWords()], kl_coef=0.0, **common),
        "gspo": lambda: GSPOModule(spec, rewards=[EvenWords()], mismatch=mismatch, **common),
        "cispo": lambda: CISPOModule(spec, rewards=[EvenWords()], mismatch=mismatch, **common),
        "reinforce_pp": lambda: REINFORCEModule(  # configs/reinforce_pp.yaml
            spec, rewards=[EvenWords()], advantage=AdvantageConfig("none", "whiten"), kl_coef=0.01, kl_reward="token",
            mismatch=mismatch, **common),
        "rloo": lambda: REINFORCEModule(  # configs/rloo.yaml
            spec, rewards=[EvenWords()], advantage=AdvantageConfig("leave_one_out", "none"), kl_coef=0.01, mismatch=mismatch, **common),
        "distill": lambda: OnPolicyDistillationModule(spec, teacher=spec, rewards=[EvenWords()], **common),
    }
    return builders[algorithm]()


class Stopwatch:
    """Wraps methods of an object to add their device-synchronised seconds under a phase name."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, owner, method: str, phase: str) -> None:
        original = getattr(owner, method)

        def timed(*args, **kwargs):
            synchronize()
            start = time.perf_counter()
            result = original(*args, **kwargs)
            synchronize()
            self.totals[phase] += time.perf_counter() - start
            return result

        setattr(owner, method, timed)


class StepTimer(L.Callback):
    def __init__(self, stopwatch: Stopwatch) -> None:
        self.stopwatch = stopwatch
        self.steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        synchronize()
        self.stopwatch.totals.clear()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        synchronize()
        step = {"step_s": time.perf_counter() - self.start, **self.stopwatch.totals}
        step["update_s"] = step.pop("update", 0.0)
        if getattr(module, "dynamic_sampling", None) is not None:
            statistics = module.dynamic_sampling_statistics
            step.update(rounds=statistics["rounds"], prompts_generated=statistics["prompts_generated"])
        self.steps.append(step)


def ours(algorithm: str, spec, prompt_file: Path, args) -> dict:
    L.seed_everything(0)
    module = build_module(algorithm, spec, prompt_file.parent, args)
    datamodule = RolloutDataModule(train_file=str(prompt_file), group_size=args.group, batch_size=args.prompts,
                                   max_prompt_length=args.prompt)
    stopwatch = Stopwatch()
    stopwatch.wrap(module.collector.engine, "generate", "generation_s")
    stopwatch.wrap(module.collector, "scorer", "scoring_s")
    stopwatch.wrap(module.collector, "logprobs", "logprobs_s")
    stopwatch.wrap(module, "update", "update")
    timer = StepTimer(stopwatch)
    profiler = [profile_callback(1, f"{algorithm}_step", args.out)] if args.profile else []
    trainer = benchmark_trainer(args.warmup + args.steps, [timer, *profiler])
    reset_peak_memory()
    trainer.fit(module, datamodule)
    mismatch = {name.removeprefix("train/"): float(value) for name, value in trainer.callback_metrics.items() if name.startswith("train/mismatch_")}
    return {"steps": timer.steps[args.warmup:], "peak_gib": peak_memory_gib(), "mismatch": mismatch}


def trl_peer(spec, prompts: list[str], args) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    def even_words(completions, **kwargs):
        return [even_share(completion) for completion in completions]

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, tokenizer_class="PreTrainedTokenizerFast")
    model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, dtype=torch.bfloat16, attn_implementation="sdpa")
    accumulation = args.prompts * args.group // args.micro_batch
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, learning_rate=1e-6, weight_decay=0.0,
        bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=accumulation,
        num_generations=args.group, max_completion_length=args.new, temperature=1.0, beta=0.0,
        logging_steps=10_000, save_strategy="no", report_to="none", dataloader_num_workers=0, lr_scheduler_type="constant",
    )
    timer = hf_step_timer()
    trainer = GRPOTrainer(model=model, reward_funcs=[even_words], args=config,
                          train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]), processing_class=tokenizer,
                          callbacks=[timer])
    reset_peak_memory()
    trainer.train()
    return {"steps": [{"step_s": s} for s in timer.seconds[args.warmup:]], "peak_gib": peak_memory_gib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=256, help="new tokens at most")
    parser.add_argument("--micro-batch", type=int, default=64, help="sequences per forward/backward")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--algorithms", nargs="+", default=["grpo"],
                        choices=["grpo", "dapo", "grape", "ppo", "gspo", "cispo", "reinforce_pp", "rloo", "distill"])
    parser.add_argument("--mismatch", choices=["none", "tis", "token_mask", "sequence_mask"], default="none",
                        help="sampler/trainer mismatch correction (not PPO's)")
    parser.add_argument("--peer", choices=["none", "trl"], default="none")
    parser.add_argument("--profile", action="store_true", help="profile our third step and print the top operators")
    parser.add_argument("--out", default=None, help="folder for profile tables")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp())
    spec = save_benchmark_model(args.shape, workdir)
    generator = torch.Generator().manual_seed(0)
    vocab = QWEN25_SHAPES[args.shape]["vocab_size"]
    prompts = [random_text(generator, args.prompt, vocab) for _ in range(args.prompts * (args.warmup + args.steps))]
    prompt_file = workdir / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))

    rows = []
    runs = {f"ours-{algorithm}": (lambda algorithm=algorithm: ours(algorithm, spec, prompt_file, args)) for algorithm in args.algorithms}
    if args.peer == "trl":
        runs["trl-grpo"] = lambda: trl_peer(spec, prompts, args)
    for name, run in runs.items():
        result = run()
        row = {"impl": name, "peak_gib": result["peak_gib"], "steps_timed": len(result["steps"]), **result.get("mismatch", {})}
        for phase in result["steps"][0]:
            row[phase] = median([step[phase] for step in result["steps"]])
        rows.append(row)
        print(row, flush=True)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    trl = next((row for row in rows if row["impl"] == "trl-grpo"), None)
    for row in rows:
        if trl is not None and row is not trl:
            row["trl_grpo_over_ours"] = trl["step_s"] / row["step_s"]
    write_report("grpo_step", rows, {"shape": args.shape, "prompts": args.prompts, "group": args.group, "new_tokens": args.new,
                                      "mismatch": args.mismatch})


if __name__ == "__main__":
    main()
