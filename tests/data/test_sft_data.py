"""SFT data: boundaries, truncation policy, packing, user files and their errors."""

import json

import pytest
import torch

from grape_lightning.algorithms import SFTModule
from grape_lightning.data import SFTDataModule
from grape_lightning.data.char_tokenizer import CHAT_TEMPLATE, build_char_tokenizer
from grape_lightning.data.formatting import encode_completion
from grape_lightning.data.jsonl import DataFormatError
from grape_lightning.data.tasks import ArithmeticTask
from tests.conftest import tiny_spec


def _datamodule(**kwargs):
    defaults = {"task": ArithmeticTask(digits=2, operators="+", num_train=50, num_val=10), "batch_size": 8}
    datamodule = SFTDataModule(**{**defaults, **kwargs})
    datamodule.set_tokenizer(build_char_tokenizer())
    datamodule.setup("fit")
    return datamodule


def test_padded_batch_marks_exactly_the_completion_and_eos():
    datamodule = _datamodule()
    batch = next(iter(datamodule.train_dataloader()))
    tokenizer = datamodule.tokenizer
    for row in range(batch["input_ids"].shape[0]):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        completion = batch["input_ids"][row][batch["response_mask"][row]].tolist()
        assert completion[-1] == tokenizer.eos_token_id
        prompt = tokenizer.decode(ids[: len(ids) - len(completion)])
        assert prompt.endswith("=") and tokenizer.decode(completion[:-1]) == str(eval(prompt[:-1]))
    assert int(batch["num_tokens"]) == int(batch["attention_mask"].sum())


def test_truncation_keeps_prompt_and_skips_prompts_that_do_not_fit(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "ab", "completion": "cdefgh"}, {"prompt": "x" * 10, "completion": "y"}, {"prompt": "p", "completion": "q"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    datamodule = _datamodule(task=None, train_file=str(path), max_length=6)
    assert (datamodule.num_truncated, datamodule.num_skipped) == (1, 1)
    assert [len(p) + len(c) for p, c in datamodule.train_pairs] == [6, 3]
    assert datamodule.train_pairs[0][0] == build_char_tokenizer()("ab")["input_ids"]


def test_packed_batches_give_the_padded_loss():
    torch.manual_seed(0)
    module = SFTModule(tiny_spec(dtype="float64"))
    padded = _datamodule(batch_size=50)
    packed = _datamodule(batch_size=50, pack=True, max_length=40)
    padded_batch = next(iter(padded.train_dataloader()))
    packed_rows = list(packed.train_dataloader())
    assert sum(int(b["response_mask"].sum()) for b in packed_rows) == int(padded_batch["response_mask"].sum())
    assert all(b["input_ids"].shape[1] <= 40 for b in packed_rows)
    assert len(packed_rows) == 1 and packed_rows[0]["input_ids"].shape[0] < 50

    def summed_logprob(batch):
        return float(module.policy_logprobs(batch).logprobs.detach()[batch["response_mask"]].sum())

    assert abs(summed_logprob(padded_batch) - summed_logprob(packed_rows[0])) < 1e-9


def test_chat_messages_keep_the_boundary_exact():
    tokenizer = build_char_tokenizer(chat_template=CHAT_TEMPLATE)
    prompt = [{"role": "system", "content": "Add."}, {"role": "user", "content": "2+2="}]
    prompt_ids, completion_ids = encode_completion(tokenizer, prompt, "4", chat_template=True)
    assert tokenizer.decode(prompt_ids) == "system: Add.\nuser: 2+2=\nassistant: "
    assert tokenizer.decode(completion_ids) == "4\n"


def test_jsonl_messages_rows_train(tmp_path):
    path = tmp_path / "chat.jsonl"
    row = {"messages": [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]}
    path.write_text(json.dumps(row) + "\n")
    datamodule = _datamodule(task=None, train_file=str(path))
    prompt_ids, completion_ids = datamodule.train_pairs[0]
    assert datamodule.tokenizer.decode(prompt_ids) == "user: 1+1=\nassistant: "
    assert datamodule.tokenizer.decode(completion_ids) == "2</s>"


def test_bad_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + json.dumps({"prompt": "a", "completion": 3}) + "\n")
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:3: field 'completion'"):
        _datamodule(task=None, train_file=str(path))
    with pytest.raises(DataFormatError, match="file not found"):
        _datamodule(task=None, train_file=str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataFormatError, match="no rows"):
        _datamodule(task=None, train_file=str(tmp_path / "empty.jsonl"))


def test_needs_a_source():
    with pytest.raises(ValueError, match="task"):
        SFTDataModule()


def test_texts_that_lose_characters_in_tokenization_are_counted_and_reported(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": "max 1 2 =", "completion": " 2"}, {"prompt": "caf\u00e9\tmax 1 2 =", "completion": " 2"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    datamodule = SFTDataModule(train_file=str(path), max_length=32)
    datamodule.set_tokenizer(build_char_tokenizer())
    with pytest.warns(UserWarning, match=r"1 texts lose characters in tokenization \(first: .*train\.jsonl:2: 'caf"):
        datamodule.setup()
    assert datamodule.num_lossy == 1
