"""The shipped yes/no critic grape/tiny-addition-critic (scripts/make_tiny_critic_model.py): it
loads like the other shipped models, LocalLMCritic's numbers are the model's own yes/no
probabilities, and it is sure and right where it learned to judge (is the response correct, is
its units digit right, is it a plain number) and unsure where its training signal conflicted (is
the response pleasing to read)."""

from __future__ import annotations

import random

import pytest
import torch

from grape_lightning.assets import builtin_model_path
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.models import ModelSpec
from grape_lightning.models.loading import load_causal_lm, load_tokenizer
from grape_lightning.rewards.critics import JudgeRequest, LocalLMCritic

CRITIC = "grape/tiny-addition-critic"
CORRECT = "Is the response the correct result of the arithmetic in the prompt?"
UNITS = "Is the units digit of the response right?"
PLAIN = "Is the response a plain number?"
PLEASING = "Is the response pleasing to read?"


def test_the_critic_ships_with_the_policys_character_tokenizer():
    directory = builtin_model_path(CRITIC)
    assert directory is not None and (directory / "model.safetensors").is_file()
    critic, policy = load_tokenizer(ModelSpec(name_or_path=CRITIC)), load_tokenizer(ModelSpec(name_or_path="grape/tiny-addition-sft"))
    text = "Criterion: Is it right?\nPrompt: 17+5=\nReference answer: 22\nResponse: 23 x\nAnswer yes or no:"
    assert critic(text)["input_ids"] == policy(text)["input_ids"] and critic.get_vocab() == policy.get_vocab()
    assert len(critic(text)["input_ids"]) == len(text)  # one token a character
    model = load_causal_lm(ModelSpec(name_or_path=CRITIC), critic)
    assert type(model).__name__ == "Qwen2ForCausalLM"


def _requests(question: str, count: int, seed: int = 0) -> list[tuple[JudgeRequest, bool]]:
    """(request, whether the response is a plain number) on held-out prompts: half plain numbers
    (the sum or a near miss), half the same numbers malformed."""
    rng = random.Random(seed)
    examples = ArithmeticTask(digits=2, operators="+", num_train=3000, num_val=200).examples("val")
    pairs = []
    for index in range(count):
        example = examples[index % len(examples)]
        value = int(example.answer) + rng.choice([0, 0, 1, -1, 10])
        number, plain = str(max(value, 0)), index % 2 == 0
        response = number if plain else rng.choice([f"={number}", f"{number}=", f"{number}+", f"{number}a", f"x{number}", ""])
        pairs.append((JudgeRequest(example.prompt, response, "item", question, example.answer), plain))
    return pairs


@pytest.fixture(scope="module")
def critic():
    return LocalLMCritic(CRITIC, device="cpu", batch_size=64)


def test_local_critic_reads_the_models_own_yes_no_probabilities(critic):
    """LocalLMCritic's batched, left-padded float32 pass against an independent float64 forward of
    each judging text alone: P(yes) = P("y") + P("Y"), P(no) = P("n") + P("N")."""
    requests = [request for request, _ in _requests(CORRECT, 4) + _requests(PLAIN, 4, seed=1) + _requests(PLEASING, 4, seed=2)]
    requests.append(JudgeRequest("3+4=", "7 apples", "item", UNITS, "7"))  # lengths differ: padding is exercised
    judgements = critic.judge(requests)
    tokenizer = load_tokenizer(ModelSpec(name_or_path=CRITIC))
    model = load_causal_lm(ModelSpec(name_or_path=CRITIC, dtype="float64"), tokenizer).eval()
    yes = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("y", "Y")]
    no = [tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("n", "N")]
    assert sorted(critic.yes_ids) == sorted(yes) and sorted(critic.no_ids) == sorted(no)
    for request, judgement in zip(requests, judgements):
        text = judgement_text = critic.prompt(request)
        assert judgement_text.endswith("\nResponse: " + request.response + "\nDoes the response meet the criterion? Answer yes or no:")
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, -1], -1)
        p_yes, p_no = float(probs[yes].sum()), float(probs[no].sum())
        assert judgement.score == pytest.approx(p_yes / (p_yes + p_no), abs=1e-5)
        assert judgement.confidence == pytest.approx(abs(p_yes - p_no), abs=1e-5)
        assert judgement.critique == f"P(yes)={p_yes:.3f} P(no)={p_no:.3f}"


def _accuracy_and_confidence(critic, question: str, count: int) -> tuple[float, float]:
    pairs = _requests(question, count)
    judgements = critic.judge([request for request, _ in pairs])
    accuracy = sum((j.score > 0.5) == right for j, (_, right) in zip(judgements, pairs)) / count
    return accuracy, sum(j.confidence for j in judgements) / count


def test_the_critic_is_sure_and_right_on_form_and_unsure_on_taste(critic):
    """On 100 held-out prompts: "is the response a plain number", which it learned, right and
    confident; "is the response pleasing to read", taught only with conflicting labels, close to
    50/50 (the shipped model: about 0.97 and 0.94 against 0.1, docs/critic.md)."""
    accuracy, confidence = _accuracy_and_confidence(critic, PLAIN, 100)
    assert accuracy >= 0.85 and confidence >= 0.7, (accuracy, confidence)
    _, unsure = _accuracy_and_confidence(critic, PLEASING, 100)
    assert unsure <= 0.25, unsure
    assert confidence - unsure >= 0.5


def _correctness_requests(question: str, count: int, seed: int = 3) -> list[tuple[JudgeRequest, bool]]:
    """(request, label) on held-out prompts: half the right sum, half a plain number that is off by
    1..9 or by tens, for which "correct" is no; its units digit is right only when off by tens."""
    rng = random.Random(seed)
    examples = ArithmeticTask(digits=2, operators="+", num_train=3000, num_val=200).examples("val")
    pairs = []
    for index in range(count):
        example = examples[index % len(examples)]
        value = int(example.answer)
        right = index % 2 == 0
        offset = 0 if right else rng.choice([k for k in (-9, -5, -3, -1, 1, 2, 4, 7, -20, -10, 10, 20, 30) if value + k >= 0])
        label = right or (question == UNITS and offset % 10 == 0)
        pairs.append((JudgeRequest(example.prompt, str(value + offset), "item", question, example.answer), label))
    return pairs


@pytest.mark.parametrize("question", [CORRECT, UNITS])
def test_the_critic_judges_answers_against_the_reference_right_and_sure(critic, question):
    """On 100 held-out prompts, the right sum and near misses: the shipped model compares the
    response's digits with the reference's (docs/critic.md: accuracy about 0.95, confidence about 0.9)."""
    pairs = _correctness_requests(question, 100)
    judgements = critic.judge([request for request, _ in pairs])
    accuracy = sum((j.score > 0.5) == label for j, (_, label) in zip(judgements, pairs)) / len(pairs)
    confidence = sum(j.confidence for j in judgements) / len(pairs)
    assert accuracy >= 0.85 and confidence >= 0.7, (accuracy, confidence)
