"""SFT and DPO training throughput at sequence length 2048: tokens/s, MFU and peak memory of our
modules, and with ``--peer trl`` of TRL's SFTTrainer and DPOTrainer on the same model, data and
settings, in the same call (``--peer trl trl-liger``: also TRL with ``use_liger_kernel=True``).

    python scripts/bench_training.py --shape qwen2.5-0.5b --peer trl trl-liger
    python scripts/bench_training.py --shape qwen2.5-0.5b --lengths variable --peer trl trl-liger

``--lengths fixed`` (the default): every row is exactly ``--seq`` tokens. ``--lengths variable``:
response lengths drawn log-uniformly from ``--min-response`` to the most that fits ``--seq``
(seeded; chosen and rejected drawn apart), the same rows for every implementation, each side run
padded and padding-free: ours padded (``padding_free=False``), padding-free with the
``sdpa_varlen`` attention, with transformers' block-diagonal ``sdpa`` mask and (on CUDA) with its
``flex_attention`` document mask; TRL padded and with ``padding_free=True`` (where TRL refuses
that under sdpa: under flex_attention, then for SFT ``packing=True``; each row's ``ran`` says
what ran). Tokens/s then counts real (non-pad) tokens: all the rows' tokens, per step on
average, over the mean timed step; MFU's attention term uses the token-weighted mean length.

Same settings on both sides: bf16 weights, AdamW, no gradient checkpointing, completion-only SFT
loss, DPO (sigmoid, beta 0.1) with the reference evaluated online every step, the same rows
(random words of the synthetic tokenizer). A step's time
is measured from its start to the end of its optimizer step, device synchronised; the first
``--warmup`` steps are left out and the median of the rest is reported. Tokens are those of the
trained sequences (for DPO, chosen plus rejected). MFU counts 6 N + attention FLOPs per trained
token (the reference forward of DPO is not counted) against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from bench_common import (
    QWEN25_SHAPES,
    benchmark_trainer,
    hf_step_timer,
    median,
    peak_flops,
    peak_memory_gib,
    profile_callback,
    random_text,
    reset_peak_memory,
    save_benchmark_model,
    synchronize,
    training_flops_per_token,
    write_report,
)

from grape_lightning.algorithms import DPOModule, OptimizerConfig, SFTModule
from grape_lightning.data import PreferenceDataModule, SFTDataModule

PROMPT_WORDS = 64


class StepTimer(L.Callback):
    """Seconds of each training step (batch start to the end of its optimizer step)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        synchronize()
        self.seconds.append(time.perf_counter() - self.start)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def response_lengths(generator: torch.Generator, count: int, seq: int, variable: bool, shortest: int) -> list[int]:
    """Words of each response: all ``seq - PROMPT_WORDS - 1`` (the EOS after the response makes the
    row seq tokens), or drawn log-uniformly from ``shortest`` to that."""
    longest = seq - PROMPT_WORDS - 1
    if not variable:
        return [longest] * count
    shortest = min(shortest, longest)
    draws = torch.rand(count, generator=generator, dtype=torch.float64).tolist()
    return [round(math.exp(math.log(shortest) + u * (math.log(longest) - math.log(shortest)))) for u in draws]


def make_rows(kind: str, count: int, seq: int, vocab: int, variable: bool = False, shortest: int = 100) -> tuple[list[dict], list[int]]:
    """The rows, and the tokens of every trained sequence (prompt + response + EOS)."""
    generator = torch.Generator().manual_seed(0)
    lengths = response_lengths(generator, (1 if kind == "sft" else 2) * count, seq, variable, shortest)
    responses = [random_text(generator, words, vocab) for words in lengths]
    prompts = [random_text(generator, PROMPT_WORDS, vocab) for _ in range(count)]
    tokens = [PROMPT_WORDS + words + 1 for words in lengths]
    if kind == "sft":
        return [{"prompt": p, "completion": c} for p, c in zip(prompts, responses)], tokens
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, responses[:count], responses[count:])], tokens


def ours(kind: str, spec, data_file: Path, args, padding_free: bool | None = None, label: str = "ours") -> dict:
    L.seed_everything(0)
    optimizer = OptimizerConfig(lr=1e-5, weight_decay=0.0)
    if kind == "sft":
        module = SFTModule(spec, optimizer=optimizer, padding_free=padding_free)
        datamodule = SFTDataModule(train_file=str(data_file), max_length=args.seq, batch_size=args.sft_batch)
    else:
        module = DPOModule(spec, optimizer=optimizer, beta=0.1, reference_logprobs="online", padding_free=padding_free)
        datamodule = PreferenceDataModule(train_file=str(data_file), max_length=args.seq, batch_size=args.dpo_pairs)
    timer = StepTimer()
    callbacks = [timer] + ([profile_callback(args.profile, f"{kind}_{label}", args.out)] if args.profile else [])
    trainer = benchmark_trainer(args.warmup + args.steps, callbacks)
    reset_peak_memory()
    trainer.fit(module, datamodule)
    return {"seconds": timer.seconds[args.warmup:], "peak_gib": peak_memory_gib()}


def trl_peer(kind: str, spec, rows: list[dict], args, liger: bool = False, padding_free: bool = False) -> dict:
    """TRL's trainer on ``rows``; ``ran`` says what ran. Padding-free runs try TRL's
    ``padding_free=True`` with sdpa attention, then (if TRL refuses that) with transformers'
    flex_attention (no download), then for SFT ``packing=True``; each refusal is noted in ``ran``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, tokenizer_class="PreTrainedTokenizerFast")
    common = dict(
        output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, learning_rate=1e-5, weight_decay=0.0,
        bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, logging_steps=10_000, save_strategy="no", report_to="none",
        dataloader_num_workers=0, max_length=args.seq, lr_scheduler_type="constant", warmup_steps=0,
        use_liger_kernel=liger,
    )
    timer = hf_step_timer()

    def trainer_with(attention: str, mode: dict):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, dtype=torch.bfloat16, attn_implementation=attention)
        if kind == "sft":
            config = SFTConfig(per_device_train_batch_size=args.sft_batch, completion_only_loss=True, **mode, **common)
            return SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                              callbacks=[timer])
        config = DPOConfig(per_device_train_batch_size=args.dpo_pairs, beta=0.1, precompute_ref_log_probs=False, **mode, **common)
        return DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[timer])

    padded = {"packing": False} if kind == "sft" else {}
    if not padding_free:
        attempts = [("sdpa", padded)]
    else:
        attempts = [("sdpa", {**padded, "padding_free": True}), ("flex_attention", {**padded, "padding_free": True})]
        attempts += [("sdpa", {"packing": True})] if kind == "sft" else []
    refusals = []
    for attention, mode in attempts:
        try:
            trainer = trainer_with(attention, mode)
            break
        except (ValueError, NotImplementedError) as refusal:
            if attempts[-1] == (attention, mode):
                raise
            refusals.append(f"{attention} {mode} refused: {str(refusal)[:120]}")
    ran = "; ".join([*refusals, f"{'liger ' if liger else ''}{attention} {mode}"])
    reset_peak_memory()
    trainer.train()
    return {"seconds": timer.seconds[args.warmup:], "peak_gib": peak_memory_gib(), "ran": ran}


def implementations(spec, data: dict[str, list[dict]], workdir: Path, args) -> dict:
    """name -> a function of the kind running it: ours first, then each peer (TRL's Liger option
    patches transformers' model classes for the whole process, so it runs last); padded and
    padding-free for variable lengths."""
    def ours_run(padding_free: bool | None = None, attention: str | None = None, label: str = "ours"):
        run_spec = dataclasses.replace(spec, attn_implementation=attention) if attention else spec
        return lambda kind: ours(kind, run_spec, workdir / f"{kind}.jsonl", args, padding_free, label)

    if args.lengths == "fixed":
        runs = {"ours": ours_run()}
    else:
        runs = {
            "ours-padded": ours_run(padding_free=False, label="ours_padded"),
            "ours-padding-free": ours_run(padding_free=True, attention="sdpa_varlen", label="ours_padding_free"),
            "ours-padding-free-sdpa-mask": ours_run(padding_free=True, attention="sdpa", label="ours_padding_free_sdpa_mask"),
        }
        if torch.cuda.is_available():  # FlexAttention has no backward on a CPU
            runs["ours-padding-free-flex"] = ours_run(padding_free=True, attention="flex_attention", label="ours_padding_free_flex")
    for peer in ("trl", "trl-liger"):
        if peer in args.peer:
            liger = peer == "trl-liger"
            runs[peer] = lambda kind, liger=liger: trl_peer(kind, spec, data[kind], args, liger=liger)
            if args.lengths == "variable":
                runs[f"{peer}-padding-free"] = lambda kind, liger=liger: trl_peer(kind, spec, data[kind], args, liger=liger, padding_free=True)
    if args.only:
        runs = {name: run for name, run in runs.items() if name in args.only}
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--sft-batch", type=int, default=8, help="sequences per SFT step")
    parser.add_argument("--dpo-pairs", type=int, default=4, help="preference pairs per DPO step")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--kinds", nargs="+", default=["sft", "dpo"])
    parser.add_argument("--peer", nargs="+", choices=["none", "trl", "trl-liger"], default=["none"],
                        help="peers run in the same call: TRL, TRL with its Liger kernels")
    parser.add_argument("--lengths", choices=["fixed", "variable"], default="fixed",
                        help="every row --seq tokens, or response lengths spread log-uniformly up to it")
    parser.add_argument("--min-response", type=int, default=100, help="shortest response (words = tokens) of --lengths variable")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="our decoder layers compiled (ModelSpec.compile)")
    parser.add_argument("--profile", type=int, default=0, help="profile this many of our steps (after 2) and print the top operators")
    parser.add_argument("--out", default=None, help="folder for profile tables")
    parser.add_argument("--only", nargs="+", default=None, help="run only these implementations (names as in the report)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp())
    spec = save_benchmark_model(args.shape, workdir)
    spec.compile = {"auto": None, "on": True, "off": False}[args.compile]
    config = QWEN25_SHAPES[args.shape]
    data, lengths = {}, {}
    for kind in args.kinds:
        count = (args.warmup + args.steps) * (args.sft_batch if kind == "sft" else args.dpo_pairs)
        data[kind], lengths[kind] = make_rows(kind, count, args.seq, config["vocab_size"], args.lengths == "variable", args.min_response)
        write_rows(workdir / f"{kind}.jsonl", data[kind])
    rows = []
    for name, run in implementations(spec, data, workdir, args).items():
        for kind in args.kinds:
            try:
                result = run(kind)
            except Exception as error:  # a peer that cannot run here (not installed, refused) leaves a row saying why
                if name.startswith("ours"):
                    raise
                rows.append({"kind": kind, "impl": name, "error": f"{type(error).__name__}: {str(error)[:300]}"})
                print(rows[-1], flush=True)
                continue
            # every row once over the run: the mean step's real tokens
            tokens_per_step = sum(lengths[kind]) / (args.warmup + args.steps)
            # a token's causal attention work grows with its sequence's length: the token-weighted mean length
            flops_per_token = training_flops_per_token(config, sum(n * n for n in lengths[kind]) / sum(lengths[kind]))
            step, mean_step = median(result["seconds"]), statistics.fmean(result["seconds"])
            tokens_per_s = tokens_per_step / (step if args.lengths == "fixed" else mean_step)
            rows.append({
                "kind": kind, "impl": name, "step_s": step, "mean_step_s": mean_step, "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * flops_per_token / peak_flops(), "peak_gib": result["peak_gib"],
                "steps_timed": len(result["seconds"]), "ran": result.get("ran", name),
                "step_seconds": [round(seconds, 4) for seconds in result["seconds"]],  # a recompilation shows as an outlier
            })
            print(rows[-1], flush=True)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    best_ours = {kind: max((row["tokens_per_s"] for row in rows if row["kind"] == kind and row["impl"].startswith("ours")), default=float("nan"))
                 for kind in args.kinds}
    for row in rows:
        if not row["impl"].startswith("ours") and "tokens_per_s" in row:
            row["ours_over_peer"] = best_ours[row["kind"]] / row["tokens_per_s"]
    name = "training" if args.lengths == "fixed" else "training_variable"
    write_report(name, rows, {"shape": args.shape, "seq": args.seq, "sft_batch": args.sft_batch, "dpo_pairs": args.dpo_pairs,
                              "compile": args.compile, "lengths": args.lengths, "min_response": args.min_response})


if __name__ == "__main__":
    main()
