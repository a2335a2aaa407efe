"""LoRA: only adapters train, the reference is the base model with adapters off (no second copy),
the merged export loads in transformers with the trained policy's logits, and a run resumes."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoModelForCausalLM

from grape_lightning.algorithms import DPOModule, GRPOModule, OptimizerConfig, SurrogateConfig
from grape_lightning.data import PreferenceDataModule
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.models.loading import load_causal_lm
from grape_lightning.models.logprobs import response_logprobs
from grape_lightning.models.lora import LoRAConfig, is_adapter_free
from grape_lightning.rewards import RewardFunction
from grape_lightning.rollout import RolloutDataModule, SamplingParams
from tests.conftest import tiny_spec

pytest.importorskip("peft")

LORA = LoRAConfig(r=4, alpha=8.0)


class LengthParity(RewardFunction):
    """A reward a random tiny model already varies on: 1 for responses of odd length."""

    def __call__(self, prompts, responses, metadata):
        return [float(len(r) % 2) for r in responses]


def _trainer(root, max_steps, **kwargs):
    options = dict(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=root,
    )
    return L.Trainer(**{**options, **kwargs})


def _dpo(dtype="float32"):
    return DPOModule(tiny_spec(lora=LORA, dtype=dtype), optimizer=OptimizerConfig(lr=5e-2), beta=0.5)


def _pairs():
    return PreferenceDataModule(task=ArithmeticTask(num_train=64, num_val=8), max_length=24, batch_size=8)


def _batch(module):
    datamodule = _pairs()
    datamodule.set_tokenizer(module.tokenizer)
    datamodule.setup()
    return next(iter(datamodule.train_dataloader()))


def test_only_adapters_train_and_the_reference_is_the_base_model(tmp_path):
    module = _dpo()
    base = load_causal_lm(tiny_spec(), module.tokenizer).eval()
    assert not isinstance(module.reference, torch.nn.Module)  # no second copy of the weights
    assert sum(p.numel() for p in module.parameters()) < 1.2 * sum(p.numel() for p in base.parameters())
    trained = {name for name, p in module.policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    before = {name: p.detach().clone() for name, p in module.policy.named_parameters()}

    trainer = _trainer(tmp_path, 5)
    trainer.fit(module, _pairs())

    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.policy.parameters() if p.requires_grad}

    changed = {name for name, p in module.policy.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= trained  # the base weights never move
    batch = _batch(module)
    expected = response_logprobs(base, batch["input_ids"], batch["response_mask"], batch["attention_mask"]).logprobs
    with torch.no_grad():
        policy = module.policy_logprobs(batch).logprobs
    reference = module.reference_logprobs(batch)
    torch.testing.assert_close(reference, expected, rtol=0, atol=0)  # exactly pi_ref
    assert (policy - expected).abs().max() > 1e-3  # while the policy itself has moved
    assert module.policy.training  # reference_model() restores the training mode


def test_merged_export_loads_with_identical_logits(tmp_path):
    torch.manual_seed(0)
    module = _dpo(dtype="float64")
    with torch.no_grad():  # adapters far from their zero start, so merging has work to do
        for name, parameter in module.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.1)
    input_ids = torch.randint(3, len(module.tokenizer), (3, 12))
    module.policy.eval()
    with torch.no_grad():
        expected = module.policy(input_ids=input_ids).logits
        with module.reference_model() as reference:
            base_logits = reference(input_ids=input_ids).logits
    assert (expected - base_logits).abs().max() > 1e-2

    module.export_hf(tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float64).eval()
    assert is_adapter_free(loaded)
    assert not any("lora" in key or "base_layer" in key for key in loaded.state_dict())
    with torch.no_grad():
        logits = loaded(input_ids=input_ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    assert not is_adapter_free(module.policy)  # the training model keeps its adapters


def _grpo_run(root, max_steps, checkpoint=None, ckpt_path=None, stop_at=None):
    L.seed_everything(0)
    module = GRPOModule(
        tiny_spec(lora=LORA), rewards=[LengthParity()], sampling=SamplingParams(max_new_tokens=4),
        optimizer=OptimizerConfig(lr=5e-2), loss=SurrogateConfig(beta=0.1),
    )
    datamodule = RolloutDataModule(task=ArithmeticTask(num_train=64, num_val=8), group_size=4, batch_size=4)
    callbacks = [c for c in (checkpoint,) if c]
    trainer = _trainer(root, max_steps, callbacks=callbacks, enable_checkpointing=bool(checkpoint))
    if stop_at is not None:
        trainer.fit_loop.epoch_loop.max_steps = stop_at  # an interrupted run: same schedule, ends early
    trainer.fit(module, datamodule, ckpt_path=ckpt_path)
    return module, trainer


def test_grpo_with_lora_trains_and_resumes(tmp_path):
    full, trainer = _grpo_run(tmp_path / "full", 6)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print("GRPO + LoRA, 6 steps:", {k: round(v, 4) for k, v in metrics.items() if k in ("train/reward", "train/loss", "train/kl")})
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values())
    assert metrics["train/kl"] > 0  # the policy moved away from the adapters-off reference

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    _grpo_run(tmp_path / "first", 6, checkpoint=checkpoint, stop_at=3)
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=True)
    assert any("lora_A" in key for key in saved["state_dict"])
    resumed, trainer = _grpo_run(tmp_path / "second", 6, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=3.ckpt"))
    assert trainer.global_step == 6
    for (name, ours), theirs in zip(resumed.policy.named_parameters(), full.policy.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)
