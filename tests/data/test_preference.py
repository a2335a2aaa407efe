"""Preference data, DPO (online vs precomputed reference, learning) and the reward model."""

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from grape_lightning.algorithms import DPOModule, GRPOModule, OptimizerConfig, RewardModelModule, SurrogateConfig
from grape_lightning.data import PreferenceDataModule
from grape_lightning.data.char_tokenizer import CHAT_TEMPLATE, build_char_tokenizer
from grape_lightning.data.jsonl import DataFormatError
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.evaluation import greedy_task_score
from grape_lightning.losses.dpo import dpo_loss
from grape_lightning.models import ModelSpec
from grape_lightning.rewards import RewardModelScore
from grape_lightning.rollout import RolloutDataModule, SamplingParams
from tests.conftest import tiny_spec

ADDITION = dict(digits=2, operators="+", num_train=3000, num_val=200)


def _datamodule(tokenizer=None, **kwargs):
    options = {"task": ArithmeticTask(num_train=40, num_val=8), "max_length": 32, "batch_size": 4, **kwargs}
    datamodule = PreferenceDataModule(**options)
    datamodule.set_tokenizer(tokenizer or build_char_tokenizer())
    datamodule.setup()
    return datamodule


def _trainer(tmp_path, max_steps, **kwargs):
    options = dict(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
        val_check_interval=max_steps, check_val_every_n_epoch=None,
    )
    return L.Trainer(**{**options, **kwargs})


# -- data --------------------------------------------------------------------------------------
def test_batch_holds_chosen_then_rejected_with_exact_boundaries():
    datamodule = _datamodule()
    batch = next(iter(datamodule.train_dataloader()))
    tokenizer = datamodule.tokenizer
    assert batch["input_ids"].shape[0] == 2 * len(batch["pair_ids"]) == 8
    for i, pair_id in enumerate(batch["pair_ids"].tolist()):
        pair = datamodule.train_pairs[pair_id]
        for row, response in ((i, pair["chosen_ids"]), (i + 4, pair["rejected_ids"])):
            ids = batch["input_ids"][row]
            assert ids[batch["response_mask"][row]].tolist() == response
            assert ids[batch["attention_mask"][row].bool()].tolist() == pair["prompt_ids"] + response
        chosen = tokenizer.decode(pair["chosen_ids"][:-1])
        prompt = tokenizer.decode(pair["prompt_ids"])
        assert str(eval(prompt[:-1])) == chosen


def test_truncation_policy(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": "p" * 10, "chosen": "c" * 10, "rejected": "r" * 3},  # prompt cut to 6, responses to 6
        {"prompt": "q", "chosen": "yes", "rejected": "no", "margin": 2.5},  # fits
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    datamodule = _datamodule(task=None, train_file=str(path), max_length=12, max_prompt_length=6)
    assert (datamodule.num_truncated, datamodule.num_skipped) == (1, 0)
    first, second = datamodule.train_pairs
    assert len(first["prompt_ids"]) == 6 and len(first["chosen_ids"]) == 6 and len(first["rejected_ids"]) == 4
    assert second["margin"] == 2.5


def test_chat_pairs_and_bad_rows(tmp_path):
    path = tmp_path / "chat.jsonl"
    conversation = [{"role": "user", "content": "2+2="}]
    row = {"chosen": conversation + [{"role": "assistant", "content": "4"}], "rejected": conversation + [{"role": "assistant", "content": "5"}]}
    path.write_text(json.dumps(row) + "\n")
    tokenizer = build_char_tokenizer(chat_template=CHAT_TEMPLATE)
    [pair] = _datamodule(tokenizer, task=None, train_file=str(path)).train_pairs
    assert tokenizer.decode(pair["prompt_ids"]) == "user: 2+2=\nassistant: "
    assert (tokenizer.decode(pair["chosen_ids"]), tokenizer.decode(pair["rejected_ids"])) == ("4\n", "5\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(DataFormatError, match=r"bad\.jsonl:1: missing field 'rejected'"):
        _datamodule(task=None, train_file=str(tmp_path / "bad.jsonl"))


# -- DPO ---------------------------------------------------------------------------------------
def test_precomputed_reference_gives_the_online_loss(tmp_path):
    online = DPOModule(tiny_spec(dtype="float64"), reference_logprobs="online")
    cached = DPOModule(tiny_spec(dtype="float64"), reference_logprobs="precompute", reference_cache_dir=str(tmp_path))
    assert online.reference is not None and cached.reference is None
    datamodule = _datamodule()
    trainer = _trainer(tmp_path, 1, limit_train_batches=0)
    trainer.fit(cached, datamodule)  # runs on_fit_start: scores every pair once, caches to disk
    assert len(list(tmp_path.glob("*.pt"))) == 1
    assert cached.reference_cache["train"].shape == (40, 2)
    with torch.no_grad():
        online.policy.load_state_dict(cached.policy.state_dict())
        for parameter in online.policy.parameters():  # make policy and reference differ
            parameter.add_(0.01 * torch.randn_like(parameter))
        cached.policy.load_state_dict(online.policy.state_dict())
    for batch in datamodule.train_dataloader():
        online_ref = online.sequence_logps(online.reference_logprobs(batch), batch)
        cached_ref = cached._reference_logps(batch, "train")
        torch.testing.assert_close(cached_ref, online_ref, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            logps = cached.sequence_logps(cached.policy_logprobs(batch).logprobs, batch)
        n = len(batch["pair_ids"])
        loss_cached, _ = dpo_loss(logps[:n], logps[n:], cached_ref[:n], cached_ref[n:])
        loss_online, _ = dpo_loss(logps[:n], logps[n:], online_ref[:n], online_ref[n:])
        assert abs(float(loss_cached) - float(loss_online)) < 1e-12 and float(loss_online) != float(torch.log(torch.tensor(2.0)))


def test_precomputed_reference_survives_a_resume(tmp_path):
    """A resumed run takes the cache from the checkpoint, never re-scoring with trained weights."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    first = DPOModule(tiny_spec(), optimizer=OptimizerConfig(lr=1e-2), reference_logprobs="precompute", reference_cache_dir=str(tmp_path / "a"))
    _trainer(tmp_path, 2, callbacks=[checkpoint], enable_checkpointing=True).fit(first, _datamodule())
    resumed = DPOModule(tiny_spec(), reference_logprobs="precompute", reference_cache_dir=str(tmp_path / "b"))
    _trainer(tmp_path, 3).fit(resumed, _datamodule(), ckpt_path=str(next((tmp_path / "ckpt").glob("*.ckpt"))))
    assert not (tmp_path / "b").exists()
    torch.testing.assert_close(resumed.reference_cache["train"], first.reference_cache["train"], rtol=0, atol=0)


@pytest.mark.parametrize("sft_weight, steps, lr, min_gain", [(0.0, 600, 5e-5, 0.04), (0.2, 300, 2e-4, 0.2)])
def test_dpo_raises_margin_and_greedy_accuracy(tmp_path, sft_weight, steps, lr, min_gain):
    """From the warm tiny model (48% greedy accuracy): pure DPO, and DPO with an NLL term."""
    L.seed_everything(0)
    task = ArithmeticTask(**ADDITION)
    module = DPOModule(ModelSpec(name_or_path="grape/tiny-addition-sft"), optimizer=OptimizerConfig(lr=lr), beta=0.1, sft_weight=sft_weight)
    datamodule = PreferenceDataModule(task=task, max_length=32, batch_size=32, val_batch_size=200)
    trainer = _trainer(tmp_path, steps)
    before = greedy_task_score(module.policy, module.tokenizer, task, max_new_tokens=6).accuracy
    start = trainer.validate(module, datamodule, verbose=False)[0]
    trainer.fit(module, datamodule)
    end = trainer.validate(module, datamodule, verbose=False)[0]
    after = greedy_task_score(module.policy, module.tokenizer, task, max_new_tokens=6).accuracy
    print(f"DPO sft_weight={sft_weight}: greedy {before:.3f} -> {after:.3f}, margin {start['val/rewards/margins']:.3f} -> "
          f"{end['val/rewards/margins']:.3f}, pair accuracy {end['val/rewards/accuracies']:.3f}")
    assert start["val/rewards/margins"] == 0.0 and end["val/rewards/margins"] > 0.3
    assert end["val/rewards/accuracies"] > 0.8
    assert after >= before + min_gain


# -- reward model ------------------------------------------------------------------------------
def test_reward_model_ranks_held_out_pairs(tmp_path):
    L.seed_everything(0)
    module = RewardModelModule(
        ModelSpec(name_or_path="grape/tiny-addition-sft"),
        optimizer=OptimizerConfig(lr=1e-3, weight_decay=0.01, warmup_steps=50, schedule="cosine"),
    )
    datamodule = PreferenceDataModule(task=ArithmeticTask(**ADDITION), max_length=32, batch_size=32, val_batch_size=200)
    trainer = _trainer(tmp_path, 2000, gradient_clip_val=1.0)
    before = trainer.validate(module, datamodule, verbose=False)[0]["val/accuracy"]
    trainer.fit(module, datamodule)
    after = trainer.validate(module, datamodule, verbose=False)[0]["val/accuracy"]
    print(f"reward model held-out pair accuracy {before:.3f} -> {after:.3f}")
    assert after > 0.9

    # Saved in Hugging Face format, it reloads to identical scores, also as a reward function.
    module.export_hf(tmp_path / "rm")
    reloaded = RewardModelModule(ModelSpec(name_or_path=str(tmp_path / "rm"))).eval()
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.scores(batch), module.eval().scores(batch), rtol=0, atol=0)
    reward = RewardModelScore(str(tmp_path / "rm"), device="cpu")
    scores = reward(["12+30=", "12+30="], ["42", "43"], [{}, {}])
    with torch.no_grad():
        expected = module.scores(_pair_batch(module, "12+30=", "42", "43"))
    assert scores == pytest.approx(expected.tolist(), abs=1e-6)
    assert scores[0] > scores[1]


def _pair_batch(module, prompt, chosen, rejected):
    from grape_lightning.data.preference import collate_pairs
    from grape_lightning.data.formatting import encode_completion

    prompt_ids, chosen_ids = encode_completion(module.tokenizer, prompt, chosen, False)
    _, rejected_ids = encode_completion(module.tokenizer, prompt, rejected, False)
    item = {"pair_id": 0, "prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "margin": 0.0}
    return collate_pairs([item], module.tokenizer.pad_token_id)


def test_reward_model_plugs_into_grpo(tmp_path):
    rm = RewardModelModule(tiny_spec())
    rm.export_hf(tmp_path / "rm")
    module = GRPOModule(tiny_spec(), rewards=[RewardModelScore(str(tmp_path / "rm"), device="cpu")], sampling=SamplingParams(max_new_tokens=3), loss=SurrogateConfig(beta=0.0))
    datamodule = RolloutDataModule(task=ArithmeticTask(num_train=16, num_val=4), group_size=4, batch_size=4)
    trainer = _trainer(tmp_path, 2, limit_val_batches=0)
    trainer.fit(module, datamodule)
    assert torch.isfinite(trainer.callback_metrics["train/reward/reward_model"])
