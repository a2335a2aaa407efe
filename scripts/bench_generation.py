"""Generation throughput: the static-cache engine (CUDA graphs) against plain ``model.generate``
and against the memory-bandwidth floor, for prompts of 128 tokens and 256 new tokens.

    python scripts/bench_generation.py --shapes qwen2.5-0.5b qwen2.5-1.5b --batches 1 16 64 256
    python scripts/bench_generation.py --shapes qwen2.5-0.5b qwen2.5-1.5b --batches 64 --samplers gumbel multinomial

``--samplers`` times the engine once per sampler (``auto``, the default path: Gumbel-max inside the
graph on a GPU; ``gumbel``; ``multinomial``: ``torch.multinomial`` after each graph replay); the
first one listed fills the ``ours_*`` columns, each one its ``<sampler>_*`` columns. Both sample at temperature 1 over the full vocabulary and generate all 256 tokens (the benchmark
model has random weights; the EOS token is disabled for both). The floor is the time to read the
weights once per step plus the KV cache that step attends to, at the bandwidth measured by a
device-to-device copy in the same run. Each number is the median over ``--repeats`` runs after a
warm-up run (which, for the engine, records the graph). Also checks, on the engine's sampled
responses, that its log-probs equal a fresh forward pass within bf16 rounding.
"""

from __future__ import annotations

import argparse

import torch
from bench_common import (
    build_model,
    measured_bandwidth,
    median,
    peak_memory_gib,
    reset_peak_memory,
    timed,
    weight_bytes,
    write_report,
)

from grape_lightning.models.logprobs import response_logprobs
from grape_lightning.rollout.sampling import SamplingParams
from grape_lightning.rollout.static_cache_engine import StaticCacheEngine


def floor_seconds(model, batch: int, prompt: int, new: int, bandwidth: float) -> float:
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_bytes_per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 2
    weights = weight_bytes(model)
    logits = batch * config.vocab_size * 2
    total = sum(weights + logits + batch * (prompt + step + 1) * kv_bytes_per_token for step in range(new))
    return total / bandwidth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["qwen2.5-0.5b"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64, 256])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--generate-repeats", type=int, default=2, help="runs of plain generate (slow)")
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--compile", action="store_true", help="also time the engine with a torch.compile'd decode step")
    parser.add_argument("--samplers", nargs="+", default=["auto"], choices=["auto", "gumbel", "multinomial"],
                        help="the engine's samplers to time, one after the other (the first fills the ours_* columns)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    bandwidth = measured_bandwidth()
    print(f"measured bandwidth: {bandwidth / 1e12:.2f} TB/s")
    rows = []
    for shape in args.shapes:
        model, tokenizer = build_model(shape, args.device)
        model.generation_config.eos_token_id = None
        tokenizer.eos_token_id = None  # every row generates all --new tokens, as plain generate does below
        params = SamplingParams(max_new_tokens=args.new, temperature=1.0)
        generator = torch.Generator(args.device).manual_seed(0)
        for batch in args.batches:
            prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt), generator=generator, device=args.device)
            prompt_lists = prompts.tolist()
            floor = floor_seconds(model, batch, args.prompt, args.new, bandwidth)
            row = {"shape": shape, "batch": batch}
            for sampler in args.samplers:
                engine = StaticCacheEngine(tokenizer, sampler=sampler)
                reset_peak_memory()
                engine.generate(model, prompt_lists, params, generator)  # warm-up: records the graph
                ours = [timed(lambda: engine.generate(model, prompt_lists, params, generator)) for _ in range(args.repeats)]
                peak = peak_memory_gib()
                out = ours[-1][1]
                tokens = int(out.response_mask.sum())
                seconds = median([seconds for seconds, _ in ours])
                with torch.no_grad():
                    fresh = response_logprobs(model, out.input_ids, out.response_mask, out.attention_mask).logprobs
                mask = out.response_mask
                logprob_error = float((fresh[mask].float() - out.logprobs[mask].float()).abs().max())
                engine.release()
                row.update({f"{sampler}_s": seconds, f"{sampler}_tok_s": tokens / seconds, f"{sampler}_over_floor": seconds / floor,
                            f"{sampler}_peak_gib": peak, f"{sampler}_max_logprob_error": logprob_error})
                row["tokens"] = tokens  # every row generates all --new tokens, whatever the sampler
                if args.compile:
                    compiled = StaticCacheEngine(tokenizer, compile=True, sampler=sampler)
                    row[f"{sampler}_compile_first_call_s"] = timed(lambda: compiled.generate(model, prompt_lists, params, generator))[0]
                    compiled_s = median([timed(lambda: compiled.generate(model, prompt_lists, params, generator))[0] for _ in range(args.repeats)])
                    row.update({f"{sampler}_compiled_s": compiled_s, f"{sampler}_compiled_tok_s": tokens / compiled_s,
                                f"{sampler}_compiled_over_floor": compiled_s / floor})
                    compiled.release()
            first = args.samplers[0]
            ours_s = row[f"{first}_s"]
            row.update(ours_s=ours_s, ours_tok_s=row[f"{first}_tok_s"], floor_s=floor, floor_tok_s=batch * args.new / floor,
                       ours_over_floor=ours_s / floor)
            if args.compile:
                row.update(compiled_s=row[f"{first}_compiled_s"], compiled_tok_s=row[f"{first}_compiled_tok_s"],
                           compiled_over_floor=row[f"{first}_compiled_over_floor"])
            if not args.skip_generate:
                def plain():
                    return model.generate(
                        prompts, attention_mask=torch.ones_like(prompts), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                        max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0,
                    )
                reset_peak_memory()
                timed(lambda: model.generate(prompts[:, :8], attention_mask=torch.ones_like(prompts[:, :8]), max_new_tokens=4,
                                             do_sample=True, pad_token_id=0))  # warm-up
                plain_s = median([timed(plain)[0] for _ in range(args.generate_repeats)])
                row.update(generate_s=plain_s, generate_tok_s=batch * args.new / plain_s, speedup=plain_s / ours_s,
                           generate_peak_gib=peak_memory_gib())
            row.update(ours_peak_gib=row[f"{first}_peak_gib"], max_logprob_error=row[f"{first}_max_logprob_error"])
            rows.append(row)
            print(row, flush=True)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    write_report("generation", rows, {"bandwidth_bytes_per_s": bandwidth, "prompt": args.prompt, "new_tokens": args.new})


if __name__ == "__main__":
    main()
