"""RolloutDataModule: grouping, metadata, JSONL prompts, skipped long prompts."""

import json

import pytest

from grape_lightning.data.char_tokenizer import build_char_tokenizer
from grape_lightning.data.jsonl import DataFormatError
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.rollout import RolloutDataModule


def _setup(**kwargs):
    datamodule = RolloutDataModule(**kwargs)
    datamodule.set_tokenizer(build_char_tokenizer())
    datamodule.setup("fit")
    return datamodule


def test_each_prompt_repeated_per_group_with_its_metadata():
    datamodule = _setup(task=ArithmeticTask(num_train=40, num_val=10), group_size=4, batch_size=3)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["groups"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for group in range(3):
        rows = range(group * 4, group * 4 + 4)
        assert len({tuple(batch["prompt_ids"][i]) for i in rows}) == 1
        prompt, answer = batch["prompts"][rows[0]], batch["metadata"][rows[0]]["answer"]
        assert str(eval(prompt[:-1])) == answer
        assert build_char_tokenizer().decode(batch["prompt_ids"][rows[0]]) == prompt
    val = next(iter(datamodule.val_dataloader()))
    assert val["groups"].tolist() == list(range(len(val["prompts"])))


def test_jsonl_prompts_and_length_limit(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "1+1=", "answer": "2", "category": "math"}, {"prompt": "x" * 50, "answer": "y"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    datamodule = _setup(train_file=str(path), max_prompt_length=20, group_size=2, batch_size=4)
    assert datamodule.num_skipped == 1
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["prompts"] == ["1+1=", "1+1="]
    assert batch["metadata"][0]["answer"] == "2" and batch["metadata"][0]["category"] == "math"
    (tmp_path / "bad.jsonl").write_text('{"answer": "2"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: missing field 'prompt'"):
        _setup(train_file=str(tmp_path / "bad.jsonl"))


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="task"):
        RolloutDataModule()
    with pytest.raises(ValueError, match="group_size"):
        RolloutDataModule(task=ArithmeticTask(num_train=4, num_val=2), group_size=0)


def test_a_validation_file_in_another_modules_format_names_its_file_line_and_field(tmp_path):
    """Chat rows (an SFT format) as the RL validation file, prompt rows as an SFT validation file."""
    from grape_lightning.data import SFTDataModule

    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"prompt": "max 3 9 =", "answer": "9"}) + "\n")
    chat = tmp_path / "val_chat.jsonl"
    chat.write_text(json.dumps({"prompt": "max 1 2 =", "answer": "2"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "max 1 2 ="}, {"role": "assistant", "content": "2"}]}) + "\n")
    with pytest.raises(DataFormatError, match=r"val_chat\.jsonl:2: missing field 'prompt'"):
        _setup(train_file=str(train), val_file=str(chat))
    sft = SFTDataModule(train_file=str(tmp_path / "sft.jsonl"), val_file=str(train))
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "max 3 9 =", "completion": " 9"}) + "\n")
    sft.set_tokenizer(build_char_tokenizer())
    with pytest.raises(DataFormatError, match=r"train\.jsonl:1: missing field 'completion'"):
        sft.setup("fit")
    with pytest.raises(DataFormatError, match=r"train\.jsonl:1: missing field 'completion'"):
        sft.reference_rows("val")  # the greedy evaluation reads the file the same way
