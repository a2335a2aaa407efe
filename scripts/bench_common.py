"""Shared pieces of the benchmarks: model shapes, timing, device ceilings, FLOP counts, reports.

The benchmark models are the Qwen2.5 shapes built from a config with random weights (speed does
not depend on the values), in bf16, with the offline character tokenizer for the few places that
need text; token ids are drawn over the model's full 151,936-token vocabulary.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.spec import ModelSpec

QWEN25_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    },
    # a few-layer, small-vocabulary stand-in for checking a script on a CPU
    "tiny": {
        "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
    },
}

# dense bf16 peak of the device, for MFU (datasheet numbers; SXM parts)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def model_spec(shape: str, dtype: str = "bfloat16") -> ModelSpec:
    return ModelSpec(config=dict(QWEN25_SHAPES[shape]), tokenizer="grape/char", dtype=dtype, attn_implementation="sdpa")


def build_model(shape: str, device: str, dtype: str = "bfloat16"):
    spec = model_spec(shape, dtype)
    tokenizer = load_tokenizer(spec)
    return load_causal_lm(spec, tokenizer).to(device).eval(), tokenizer


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call, the device synchronised on both sides."""
    synchronize()
    start = time.perf_counter()
    result = function()
    synchronize()
    return time.perf_counter() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def reset_peak_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def measured_bandwidth(gib: float = 2.0, repeats: int = 20) -> float:
    """Device memory bandwidth in bytes/s: a large device-to-device copy, bytes read plus written."""
    if not torch.cuda.is_available():
        return float("nan")
    source = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda").random_()
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * source.numel() / median(times)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the (unique) parameters: what one decode step must read at least once."""
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() not in seen:
            seen.add(parameter.data_ptr())
            total += parameter.numel() * parameter.element_size()
    return total


def training_flops_per_token(config: dict[str, Any], sequence: float) -> float:
    """Forward + backward FLOPs per token of a decoder (the PaLM appendix count): 6 N for the
    matrix products of N non-embedding parameters plus the LM head, and 6 * 2 * layers * hidden *
    sequence / 2 for causal attention scores and values (half the square is masked)."""
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    attention_projections = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * config["intermediate_size"]
    matmul_params = layers * (attention_projections + mlp) + hidden * config["vocab_size"]
    attention = 2 * layers * hidden * sequence  # QK^T and AV per token, causal half: 2 * (2 * L * H * T) / 2
    return 6 * matmul_params + 3 * attention


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"


def peak_flops() -> float:
    name = device_name()
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), float("nan"))


def versions() -> dict[str, str]:
    import lightning
    import transformers

    found = {"torch": torch.__version__, "lightning": lightning.__version__, "transformers": transformers.__version__}
    try:
        import trl

        found["trl"] = trl.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        found["cuda"] = torch.version.cuda or ""
    return found


def write_report(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
    """Print the rows as a table and save them (with device and versions) as JSON under $OUT or ./benchmarks/out."""
    report = {"device": device_name(), "versions": versions(), "rows": rows, **(extra or {})}
    directory = Path(os.environ.get("OUT") or "benchmarks/out")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(report, indent=2))
    print(f"\n== {name} on {report['device']} ({', '.join(f'{k} {v}' for k, v in report['versions'].items())})")
    if rows:
        columns = list(dict.fromkeys(column for row in rows for column in row))  # rows may differ (an error row)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c)) for c in columns))


def synthetic_tokenizer(vocab_size: int):
    """A word-level fast tokenizer whose words are ``w0 .. w{vocab_size - 4}`` plus pad/eos/bos/unk:
    text of n random words is exactly n tokens, and every id of the model's vocabulary decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(special + [f"w{i}" for i in range(vocab_size - len(special))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


def random_text(generator: torch.Generator, words: int, vocab_size: int) -> str:
    ids = torch.randint(0, vocab_size - 4, (words,), generator=generator).tolist()
    return " ".join(f"w{i}" for i in ids)


def save_benchmark_model(shape: str, directory: Path, dtype: str = "bfloat16") -> ModelSpec:
    """A random-weight model of ``shape`` (``directory/model``) and the synthetic tokenizer
    (``directory/tokenizer``: apart from the model, since a model config would make
    ``AutoTokenizer`` rebuild it as that model family's tokenizer). Both our modules (through the
    returned spec) and a peer trainer load them from there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(QWEN25_SHAPES[shape])
    tokenizer = synthetic_tokenizer(config["vocab_size"])
    model_type = config.pop("model_type")
    config.update(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=getattr(torch, dtype))
    model.save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "tokenizer")
    return ModelSpec(name_or_path=str(directory / "model"), tokenizer=str(directory / "tokenizer"), dtype=dtype, attn_implementation="sdpa")


def hf_step_timer():
    """A ``transformers`` callback recording the seconds of each optimizer step, device synchronised."""
    from transformers import TrainerCallback

    class HFStepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []

        def on_step_begin(self, *_, **__) -> None:
            synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__) -> None:
            synchronize()
            self.seconds.append(time.perf_counter() - self.start)

    return HFStepTimer()


def profile_callback(steps: int, label: str, out_dir: str | None = None):
    """A Lightning callback that runs ``torch.profiler`` over training steps 2 .. 2 + ``steps`` and
    prints the operators that took the most device time (written to ``out_dir/profile_<label>.txt``
    too when given): where a step's time goes."""
    import lightning as L
    from torch.profiler import ProfilerActivity, profile

    class ProfileSteps(L.Callback):
        def __init__(self) -> None:
            self.profiler = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == 2:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.profiler = profile(activities=activities)
                self.profiler.__enter__()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            if self.profiler is not None and batch_idx == 1 + steps:
                synchronize()
                self.profiler.__exit__(None, None, None)
                key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                table = self.profiler.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70)
                print(f"== profile of {label}, {steps} steps\n{table}", flush=True)
                if out_dir:
                    Path(out_dir, f"profile_{label}.txt").write_text(table)
                self.profiler = None

    return ProfileSteps()


def benchmark_trainer(steps: int, callbacks: list):
    """The Lightning trainer of our side of a benchmark: one device, bf16 weights, nothing but the steps."""
    import lightning as L

    return L.Trainer(
        accelerator="auto", devices=1, precision="bf16-true", max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=callbacks,
    )
