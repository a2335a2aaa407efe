"""Build the tiny yes/no critic that configs/grape.yaml's judged rubric items ask.

    python scripts/make_tiny_critic_model.py          # writes grape_lightning/assets/tiny-addition-critic
                                                      # and docs/critic_report.json

A causal LM with the character tokenizer of grape/tiny-addition-sft, trained from seeded random
weights to answer the next token "y" or "n" after exactly the text LocalLMCritic shows it
(``LocalLMCritic.prompt``: criterion, prompt, reference answer, response, "Answer yes or no:"),
so that at run time

    score s = P(yes) / (P(yes) + P(no)),   confidence c = |P(yes) - P(no)|.

The loss is the cross-entropy of that one next token; its minimiser is the true conditional
probability of "yes" given the text, so c is high where the text decides the answer and near 0
where it does not. A next-token loss on the judging text itself is added (``--text-loss-weight``)
so that the model learns to read the digits it compares, and the training rows come in
contrasting twos (the same prompt and question, one response labelled yes and one no), so that
each batch's gradient is about the response rather than the prompt or the base rate.

Pairs: two-digit addition prompts (the train split of configs/grape.yaml's task; the report uses
its val split, never trained on) with the rubric scorer's reference answer, and responses like
the policy's: answers sampled from grape/tiny-addition-sft at temperature 1 (as configs/grape.yaml
samples), the right sum, near misses (off by 1..9), off-by-tens (10..90), and malformed
answers (an echoed "=", a trailing sign, letters, spaces, the prompt repeated, nothing).

Questions and their labels, chosen so that the critic has something to learn on some and
nothing to learn on one (what it did learn, per question, is in docs/critic.md: with the
default budget it is right on 93.5% of held-out ``correct`` pairs and on every ``units_digit``
and ``plain_number`` pair, and stays at 50/50 on ``pleasing``):

- ``correct`` "Is the response the correct result of the arithmetic in the prompt?": the task's
  numeric match against the reference.
- ``units_digit`` "Is the units digit of the response right?": a plain number whose last digit is
  the reference's.
- ``plain_number`` "Is the response a plain number?": digits only, nothing else.
- ``pleasing`` "Is the response pleasing to read?": a matter of taste on which the training
  graders disagree: each training text comes twice, labelled once yes and once no (the held-out
  labels are fair coin flips). The right answer is "no idea": trained on conflicting labels the
  critic should say 50/50 (confidence near 0), and GRAPE's confidence weighting then gives this
  item almost no influence.

The report (printed and written as JSON) gives, per question on held-out pairs: accuracy of the
critic's answer (s > 0.5 means yes), mean confidence c, and a reliability table: bins of c, each
with its count, mean c, the mean probability the critic gives its own answer
p = max(s, 1 - s), and the accuracy in the bin; and the expected calibration error
ECE = sum_b (n_b / N) |accuracy_b - mean p_b| (a calibrated critic is right with probability p,
which is about (1 + c) / 2 when its mass is on yes and no).

The budget: 4000 steps of 64 rows. Comparing the response's digits with the reference's is
learned late and suddenly (the answer loss sits near 0.47 for a long while, then falls to the
0.23 the coin-flip question leaves); 600 or 1500 steps of 32 rows stop before that, and 3000
steps of 32 made it for two seeds of three on a GPU (``--device cuda``, for trying recipes; the
shipped model is built on the CPU).

Deterministic under the seed on one machine and torch build (CPU, plain PyTorch: no Lightning
in the loop); 22 minutes on a shared two-core machine, nearly all of it the training steps.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from grape_lightning.data.collate import pad_left
from grape_lightning.data.formatting import encode_prompt
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.data.tasks.base import Example
from grape_lightning.models import ModelSpec
from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.models.logprobs import positions_from_mask
from grape_lightning.models.tokenizer_check import save_tokenizer
from grape_lightning.rewards.critics import JudgeRequest, LocalLMCritic
from policy_samples import sample_policy_answers

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "grape_lightning" / "assets" / "tiny-addition-critic"
DEFAULT_REPORT = ROOT / "docs" / "critic_report.json"
ADDITION = dict(digits=2, operators="+", num_train=3000, num_val=200)  # configs/grape.yaml's task
TINY_QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,  # the judging text is about 160 characters
    "tie_word_embeddings": True,
}
TASK = ArithmeticTask(**ADDITION)
_PLAIN = re.compile(r"[0-9]+")


def _digit(number: str, place: int) -> int:
    return int(number) // 10**place % 10


def is_plain_number(response: str) -> bool:
    return _PLAIN.fullmatch(response) is not None


def label_correct(response: str, answer: str, rng: random.Random) -> bool:
    return TASK.verify(response, answer) == 1.0


def label_units(response: str, answer: str, rng: random.Random) -> bool:
    return is_plain_number(response) and _digit(response, 0) == _digit(answer, 0)


def label_plain(response: str, answer: str, rng: random.Random) -> bool:
    return is_plain_number(response)


def label_coin(response: str, answer: str, rng: random.Random) -> bool:
    return rng.random() < 0.5


@dataclass(frozen=True)
class Question:
    name: str
    text: str
    label: object  # (response, answer, rng) -> bool


QUESTIONS = (
    Question("correct", "Is the response the correct result of the arithmetic in the prompt?", label_correct),
    Question("units_digit", "Is the units digit of the response right?", label_units),
    Question("plain_number", "Is the response a plain number?", label_plain),
    Question("pleasing", "Is the response pleasing to read?", label_coin),
)


# -- responses ---------------------------------------------------------------------------------
def synthetic_response(example: Example, rng: random.Random) -> str:
    """The right sum, a near miss, an off-by-tens answer or a malformed one."""
    value = int(example.answer)
    kind = rng.choices(["right", "units", "tens", "malformed"], weights=[3, 3, 2, 2])[0]
    if kind == "right":
        return example.answer
    if kind == "units":
        return str(value + rng.choice([k for k in range(-9, 10) if k != 0 and value + k >= 0]))
    if kind == "tens":
        return str(value + rng.choice([k for k in range(-90, 100, 10) if k != 0 and value + k >= 0]))
    shown = rng.choice([example.answer, str(value + rng.choice([-1, 1, 10]))])
    return rng.choice([
        f"={shown}", f"{shown}=", f"{shown}+", f"{shown[:-1]} {shown[-1:]}", f"{shown}a", f"x{shown}",
        example.prompt, example.prompt + shown, "", "+", f"{shown}{shown}",
    ])


def make_pairs(examples: list[Example], policy_answers: dict[str, list[str]], per_prompt: int, seed: int) -> list[tuple[str, bool, str, int]]:
    """(judging text, label, question name, source) rows: ``per_prompt`` per prompt and question,
    half with a policy answer (source 1), half synthetic (source 0)."""
    rng = random.Random(seed)
    rows = []
    for example in examples:
        for question in QUESTIONS:
            for k in range(per_prompt):
                from_policy = k % 2 == 0
                response = rng.choice(policy_answers[example.prompt]) if from_policy else synthetic_response(example, rng)
                label = question.label(response, example.answer, rng)
                rows.append((judging_text(example, question, response), label, question.name, int(from_policy)))
    return rows


def judging_text(example: Example, question: Question, response: str) -> str:
    """Exactly the text LocalLMCritic puts before the answer token, the reference answer included
    as GRAPE's rubric scorer passes it."""
    return LocalLMCritic("unused").prompt(JudgeRequest(example.prompt, response, question.name, question.text, example.answer))


def contrast(example: Example, question: Question, response: str, label: bool, rng: random.Random) -> str:
    """A response to the same prompt whose answer to ``question`` is the opposite of ``label``."""
    for _ in range(1000):
        other = synthetic_response(example, rng) if rng.random() < 0.8 else rng.choice([example.answer, "", example.prompt])
        if question.label(other, example.answer, rng) != label:
            return other
    raise RuntimeError(f"no contrasting response for {example.prompt!r} and {question.name!r}")


def training_units(examples: list[Example], policy_answers: dict[str, list[str]], per_prompt: int, seed: int) -> list[list[tuple[str, bool]]]:
    """Training rows in contrasting twos: (text, label) for one prompt and question with a response
    from the policy or synthetic, and the same prompt and question with a response of the opposite
    label, so that a batch's gradient is about the response and not the prompt or the base rate.
    The coin-flip question's two are the same text, once "yes" and once "no": the conflicting
    signal whose best answer is 50/50."""
    rng = random.Random(seed)
    units = []
    for example in examples:
        for question in QUESTIONS:
            for k in range(per_prompt):
                response = rng.choice(policy_answers[example.prompt]) if k % 2 == 0 else synthetic_response(example, rng)
                text = judging_text(example, question, response)
                if question.label is label_coin:
                    units.append([(text, True), (text, False)])
                    continue
                label = question.label(response, example.answer, rng)
                other = contrast(example, question, response, label, rng)
                units.append([(text, label), (judging_text(example, question, other), not label)])
    return units


# -- the model's yes/no probabilities, computed as LocalLMCritic computes them --------------------
def forward(model, tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits [B, T, V], input ids, attention mask) of the left-padded texts, as LocalLMCritic pads them."""
    ids = [encode_prompt(tokenizer, text, chat_template=False) for text in texts]
    device = next(model.parameters()).device
    input_ids = pad_left(ids, tokenizer.pad_token_id).to(device)
    mask = pad_left([[1] * len(i) for i in ids], 0).to(device)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    return logits, input_ids, mask


def last_logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    return forward(model, tokenizer, texts)[0][:, -1]


@torch.no_grad()
def judge(model, tokenizer, yes_ids: list[int], no_ids: list[int], texts: list[str], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(P(yes), P(no)) per text."""
    model.eval()
    yes, no = [], []
    for start in range(0, len(texts), batch_size):
        probs = torch.softmax(last_logits(model, tokenizer, texts[start : start + batch_size]).float(), dim=-1)
        yes.append(probs[:, yes_ids].sum(-1).cpu())
        no.append(probs[:, no_ids].sum(-1).cpu())
    return torch.cat(yes).double(), torch.cat(no).double()


# -- the report --------------------------------------------------------------------------------
def reliability(confidence: torch.Tensor, stated: torch.Tensor, right: torch.Tensor, bins: int = 10) -> tuple[list[dict], float]:
    """Rows (c bin, count, mean c, mean stated probability p, accuracy) and
    ECE = sum_b (n_b / N) |accuracy_b - mean p_b|."""
    index = (confidence * bins).long().clamp(max=bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if not count:
            continue
        accuracy, mean_p = float(right[members].double().mean()), float(stated[members].mean())
        table.append({
            "bin": [b / bins, (b + 1) / bins], "count": count, "mean_confidence": round(float(confidence[members].mean()), 4),
            "mean_stated_probability": round(mean_p, 4), "accuracy": round(accuracy, 4),
        })
        ece += count / len(confidence) * abs(accuracy - mean_p)
    return table, ece


def report(model, tokenizer, yes_ids, no_ids, rows) -> dict:
    texts = [row[0] for row in rows]
    labels = torch.tensor([row[1] for row in rows])
    names = [row[2] for row in rows]
    from_policy = torch.tensor([row[3] for row in rows], dtype=torch.bool)
    p_yes, p_no = judge(model, tokenizer, yes_ids, no_ids, texts)
    score = p_yes / (p_yes + p_no)
    confidence = (p_yes - p_no).abs()
    right = (score > 0.5) == labels
    stated = torch.maximum(score, 1 - score)
    out = {}
    for question in QUESTIONS:
        rows_q = torch.tensor([name == question.name for name in names])
        table, ece = reliability(confidence[rows_q], stated[rows_q], right[rows_q])
        policy_rows = rows_q & from_policy
        out[question.name] = {
            "question": question.text,
            "pairs": int(rows_q.sum()),
            "yes_rate": round(float(labels[rows_q].double().mean()), 4),
            "accuracy": round(float(right[rows_q].double().mean()), 4),
            "accuracy_on_policy_answers": round(float(right[policy_rows].double().mean()), 4),
            "mean_confidence": round(float(confidence[rows_q].mean()), 4),
            "mean_confidence_on_policy_answers": round(float(confidence[policy_rows].mean()), 4),
            "ece": round(ece, 4),
            "reliability": table,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--text-loss-weight", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--samples", type=int, default=2, help="policy answers sampled per prompt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=TINY_QWEN2["hidden_size"])
    parser.add_argument("--layers", type=int, default=TINY_QWEN2["num_hidden_layers"])
    parser.add_argument("--per-prompt", type=int, default=4, help="training twos per prompt and question")
    parser.add_argument("--device", default="cpu", help="where to train (the shipped model is built on the CPU)")
    args = parser.parse_args()
    began = time.perf_counter()

    train, val = TASK.examples("train"), TASK.examples("val")
    answers = sample_policy_answers(train + val, args.samples, args.seed)
    train_units = training_units(train, answers, per_prompt=args.per_prompt, seed=args.seed)
    val_rows = make_pairs(val, answers, per_prompt=4, seed=args.seed + 1)
    sampled = time.perf_counter()

    tokenizer = load_tokenizer("grape/char")
    config = dict(TINY_QWEN2, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size, num_hidden_layers=args.layers)
    model = load_causal_lm(ModelSpec(config=config, tokenizer="grape/char", init_seed=args.seed), tokenizer).to(args.device)
    judging = LocalLMCritic("unused")
    judging.tokenizer = tokenizer
    yes_ids, no_ids = judging._first_token_ids(judging.yes_words), judging._first_token_ids(judging.no_words)
    yes_ids, no_ids = [i for i in yes_ids if i not in no_ids], [i for i in no_ids if i not in yes_ids]
    target_yes, target_no = tokenizer("y", add_special_tokens=False)["input_ids"][0], tokenizer("n", add_special_tokens=False)["input_ids"][0]

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    warmup = 50
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)))
    )
    order = random.Random(args.seed)
    model.train()
    running = []
    for step in range(args.steps):
        batch = [row for unit in order.sample(train_units, args.batch_size // 2) for row in unit]
        logits, input_ids, mask = forward(model, tokenizer, [row[0] for row in batch])
        targets = torch.tensor([target_yes if row[1] else target_no for row in batch], device=logits.device)
        answer_loss = torch.nn.functional.cross_entropy(logits[:, -1], targets)
        # next-token loss on the judging text itself: it teaches the model to read the digits it compares
        text_targets = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        text_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), text_targets.flatten())
        loss = answer_loss + args.text_loss_weight * text_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        running.append((answer_loss.item(), text_loss.item()))
        if (step + 1) % 100 == 0:
            answer_mean, text_mean = (sum(values) / len(values) for values in zip(*running))
            print(f"step {step + 1}: answer loss {answer_mean:.4f}, text loss {text_mean:.4f} ({time.perf_counter() - began:.0f} s)", flush=True)
            running = []

    model.eval()
    train_check = [row for unit in random.Random(args.seed + 2).sample(train_units, 1000) for row in unit]
    texts = [row[0] for row in train_check]
    p_yes, p_no = judge(model, tokenizer, yes_ids, no_ids, texts)
    train_accuracy = float(((p_yes > p_no) == torch.tensor([row[1] for row in train_check])).double().mean())
    held_out = report(model, tokenizer, yes_ids, no_ids, val_rows)

    model.cpu().save_pretrained(args.output, safe_serialization=True)
    save_tokenizer(tokenizer, args.output)
    summary = {
        "built_by": "python scripts/make_tiny_critic_model.py",
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "train_pairs": 2 * len(train_units), "held_out_pairs": len(val_rows),
        "train_accuracy_on_2000_training_pairs": round(train_accuracy, 4),
        "held_out": held_out,
    }
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"train accuracy (1000 contrasting twos of training pairs): {train_accuracy:.3f}")
    print(f"held-out pairs ({len(val_rows)}, prompts never trained on):")
    print(f"{'question':<14}{'yes rate':>9}{'accuracy':>10}{'mean c':>8}{'ECE':>7}   (policy answers: accuracy, mean c)")
    for name, row in held_out.items():
        print(f"{name:<14}{row['yes_rate']:>9.3f}{row['accuracy']:>10.3f}{row['mean_confidence']:>8.3f}{row['ece']:>7.3f}"
              f"   {row['accuracy_on_policy_answers']:.3f}, {row['mean_confidence_on_policy_answers']:.3f}")
    print(f"sampled policy answers and built {2 * len(train_units)} training pairs in {sampled - began:.0f} s")
    print(f"wrote {args.output} and {args.report} in {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
