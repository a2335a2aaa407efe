"""The path of a user with their own JSONL task (prompts with spaces): train with the real
``grape`` command (in this process), export, reload the export through ``AutoTokenizer``, the
library's loader and ``grape validate``; the tokenizer is the one the model was trained with, and
the run reports greedy accuracy on the user's rows before and after."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from grape_lightning.data.char_tokenizer import build_char_tokenizer
from grape_lightning.evaluation import greedy_reward_score
from grape_lightning.models.loading import load_tokenizer
from grape_lightning.rewards import ExactMatch
from tests.cli_runner import ROOT, grape_here
from tests.models.test_tokenizer_round_trip import assert_same_tokenizer

MAX_NEW_TOKENS = 4


def max_rows(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        numbers = [rng.randint(10, 99) for _ in range(4)]
        rows.append({"prompt": f"max {' '.join(map(str, numbers))} =", "completion": f" {max(numbers)}"})
    return rows


@pytest.fixture(scope="module")
def user_run(tmp_path_factory):
    """configs/sft.yaml on train.jsonl / val.jsonl for a few steps (the config's built-in task stays
    in the YAML: the files replace it, for training and for evaluation)."""
    workdir = tmp_path_factory.mktemp("user_data")
    for name, rows in (("train.jsonl", max_rows(64, 0)), ("val.jsonl", max_rows(12, 1))):
        (workdir / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    override = {
        "trainer": {
            "max_steps": 4,
            "val_check_interval": 2,
            "log_every_n_steps": 1,
            "callbacks": [
                {"class_path": "grape_lightning.callbacks.GreedyTaskAccuracy", "init_args": {
                    "num_examples": 12, "max_new_tokens": MAX_NEW_TOKENS,
                    "reward": {"class_path": "grape_lightning.rewards.ExactMatch"}}},
                {"class_path": "grape_lightning.callbacks.HFExport"},
                {"class_path": "grape_lightning.callbacks.RunSummary"},
            ],
        },
        "data": {"init_args": {"train_file": "train.jsonl", "val_file": "val.jsonl", "batch_size": 16}},
    }
    (workdir / "override.yaml").write_text(yaml.safe_dump(override))
    _, output = grape_here("fit", "--config", str(ROOT / "configs/sft.yaml"), "--config", "override.yaml", cwd=workdir)
    return workdir, workdir / "runs" / "sft" / "version_0" / "hf", output


def test_export_reloads_the_training_tokenizer(user_run):
    workdir, export, _ = user_run
    trained_with = build_char_tokenizer()
    auto, library = AutoTokenizer.from_pretrained(export), load_tokenizer(str(export))
    for reloaded in (auto, library):
        assert_same_tokenizer(trained_with, reloaded)
        for line in (workdir / "val.jsonl").read_text().splitlines():
            prompt = json.loads(line)["prompt"]
            ids = trained_with(prompt)["input_ids"]
            assert reloaded(prompt)["input_ids"] == ids and reloaded.decode(ids) == prompt
    assert auto("max 1 =")["input_ids"] == [81, 69, 92, 4, 21, 4, 33]


def test_run_reports_greedy_accuracy_on_the_users_rows_before_and_after(user_run):
    _, _, output = user_run
    assert re.search(r"val/accuracy: before \d\.\d{3} -> after \d\.\d{3}", output), output[-3000:]
    assert "before n/a" not in output and "after n/a" not in output


def test_validate_on_the_export_scores_as_the_trained_model(user_run):
    """``grape validate`` from the export gives the loss and accuracy of the exported weights under
    the training tokenizer (computed here by hand): a tokenizer dropping the spaces would not."""
    workdir, export, _ = user_run
    override = {"model": {"init_args": {"policy": {"name_or_path": str(export), "config": None, "tokenizer": None}}}}
    (workdir / "validate.yaml").write_text(yaml.safe_dump(override))
    _, output = grape_here("validate", "--config", str(ROOT / "configs/sft.yaml"), "--config", "override.yaml",
                           "--config", "validate.yaml", cwd=workdir)
    reported = {name: float(re.search(rf"{name}\s*\S\s*([0-9.]+)", output).group(1)) for name in ("val/loss", "val/accuracy")}

    tokenizer = build_char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float64).eval()
    rows = [json.loads(line) for line in (workdir / "val.jsonl").read_text().splitlines()]
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt = tokenizer(row["prompt"])["input_ids"]
            completion = tokenizer(row["completion"])["input_ids"] + [tokenizer.eos_token_id]
            logprobs = model(torch.tensor([prompt + completion])).logits[0].log_softmax(-1)
            positions = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
            nll -= sum(float(logprobs[p, token]) for p, token in zip(positions, completion))
            tokens += len(completion)
    assert reported["val/loss"] == pytest.approx(nll / tokens, rel=1e-4)
    references = [{"prompt": row["prompt"], "metadata": {"answer": row["completion"]}} for row in rows]
    expected = greedy_reward_score(model.float(), tokenizer, references, ExactMatch(), max_new_tokens=MAX_NEW_TOKENS)
    assert reported["val/accuracy"] == pytest.approx(expected.accuracy, abs=1e-6)

