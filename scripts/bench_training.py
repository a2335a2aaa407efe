"""SFT and DPO training throughput at sequence length 2048: tokens/s, MFU and peak memory of our
modules, and with ``--peer trl`` of TRL's SFTTrainer and DPOTrainer on the same model, data and
settings, in the same call.

    python scripts/bench_training.py --shape qwen2.5-0.5b --peer trl

Same settings on both sides: bf16 weights, AdamW, no gradient checkpointing, completion-only SFT
loss, DPO (sigmoid, beta 0.1) with the reference evaluated online every step, the same rows
(random words of the synthetic tokenizer: every row is exactly ``--seq`` tokens). A step's time
is measured from its start to the end of its optimizer step, device synchronised; the first
``--warmup`` steps are left out and the median of the rest is reported. Tokens are those of the
trained sequences (for DPO, chosen plus rejected). MFU counts 6 N + attention FLOPs per trained
token (the reference forward of DPO is not counted) against the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import json
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


def make_rows(kind: str, count: int, seq: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    words = seq - PROMPT_WORDS - 1  # the EOS after the response makes it seq tokens
    if kind == "sft":
        return [{"prompt": random_text(generator, PROMPT_WORDS, vocab), "completion": random_text(generator, words, vocab)}
                for _ in range(count)]
    return [{"prompt": random_text(generator, PROMPT_WORDS, vocab), "chosen": random_text(generator, words, vocab),
             "rejected": random_text(generator, words, vocab)} for _ in range(count)]


def ours(kind: str, spec, data_file: Path, args) -> dict:
    L.seed_everything(0)
    optimizer = OptimizerConfig(lr=1e-5, weight_decay=0.0)
    if kind == "sft":
        module = SFTModule(spec, optimizer=optimizer)
        datamodule = SFTDataModule(train_file=str(data_file), max_length=args.seq, batch_size=args.sft_batch)
    else:
        module = DPOModule(spec, optimizer=optimizer, beta=0.1, reference_logprobs="online")
        datamodule = PreferenceDataModule(train_file=str(data_file), max_length=args.seq, batch_size=args.dpo_pairs)
    timer = StepTimer()
    callbacks = [timer] + ([profile_callback(args.profile, f"{kind}_ours", args.out)] if args.profile else [])
    trainer = benchmark_trainer(args.warmup + args.steps, callbacks)
    reset_peak_memory()
    trainer.fit(module, datamodule)
    return {"seconds": timer.seconds[args.warmup:], "peak_gib": peak_memory_gib()}


def trl_peer(kind: str, spec, rows: list[dict], args, liger: bool = False) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer, tokenizer_class="PreTrainedTokenizerFast")
    model = AutoModelForCausalLM.from_pretrained(spec.name_or_path, dtype=torch.bfloat16, attn_implementation="sdpa")
    common = dict(
        output_dir=tempfile.mkdtemp(), max_steps=args.warmup + args.steps, learning_rate=1e-5, weight_decay=0.0,
        bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(), gradient_checkpointing=False, logging_steps=10_000, save_strategy="no", report_to="none",
        dataloader_num_workers=0, max_length=args.seq, lr_scheduler_type="constant", warmup_steps=0,
        use_liger_kernel=liger,
    )
    timer = hf_step_timer()
    if kind == "sft":
        config = SFTConfig(per_device_train_batch_size=args.sft_batch, packing=False, completion_only_loss=True, **common)
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[timer])
    else:
        config = DPOConfig(per_device_train_batch_size=args.dpo_pairs, beta=0.1, precompute_ref_log_probs=False, **common)
        trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                             callbacks=[timer])
    reset_peak_memory()
    trainer.train()
    return {"seconds": timer.seconds[args.warmup:], "peak_gib": peak_memory_gib()}


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
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="our decoder layers compiled (ModelSpec.compile)")
    parser.add_argument("--profile", type=int, default=0, help="profile this many of our steps (after 2) and print the top operators")
    parser.add_argument("--out", default=None, help="folder for profile tables")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp())
    spec = save_benchmark_model(args.shape, workdir)
    spec.compile = {"auto": None, "on": True, "off": False}[args.compile]
    config = QWEN25_SHAPES[args.shape]
    flops_per_token = training_flops_per_token(config, args.seq)
    data = {}
    for kind in args.kinds:
        count = (args.warmup + args.steps) * (args.sft_batch if kind == "sft" else args.dpo_pairs)
        data[kind] = make_rows(kind, count, args.seq, config["vocab_size"])
        write_rows(workdir / f"{kind}.jsonl", data[kind])
    runs = {"ours": lambda kind: ours(kind, spec, workdir / f"{kind}.jsonl", args)}
    if "trl" in args.peer:
        runs["trl"] = lambda kind: trl_peer(kind, spec, data[kind], args)
    if "trl-liger" in args.peer:
        # last: TRL's Liger option patches the model classes of transformers for the whole process
        runs["trl-liger"] = lambda kind: trl_peer(kind, spec, data[kind], args, liger=True)
    rows = []
    for name, run in runs.items():
        for kind in args.kinds:
            result = run(kind)
            tokens_per_s = args.seq * (args.sft_batch if kind == "sft" else 2 * args.dpo_pairs) / median(result["seconds"])
            rows.append({
                "kind": kind, "impl": name, "step_s": median(result["seconds"]), "tokens_per_s": tokens_per_s,
                "mfu": tokens_per_s * flops_per_token / peak_flops(), "peak_gib": result["peak_gib"],
                "steps_timed": len(result["seconds"]),
            })
            print(rows[-1], flush=True)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    ours_rate = {row["kind"]: row["tokens_per_s"] for row in rows if row["impl"] == "ours"}
    for row in rows:
        if row["impl"] != "ours":
            row["ours_over_peer"] = ours_rate[row["kind"]] / row["tokens_per_s"]
    write_report("training", rows, {"shape": args.shape, "seq": args.seq, "sft_batch": args.sft_batch, "dpo_pairs": args.dpo_pairs,
                                    "compile": args.compile})


if __name__ == "__main__":
    main()
