"""On-policy distillation mechanics: the teacher's log-probs of the sampled tokens, the logged
reverse KL against a plain forward of both models, a teacher that is never trained nor saved,
resume and export without it, and the refusals (another tokenizer, a second epoch, ...)."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from grape_lightning.algorithms import OnPolicyDistillationModule, OptimizerConfig, UpdateConfig
from grape_lightning.data.char_tokenizer import build_char_tokenizer
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.models.loading import load_tokenizer
from grape_lightning.models.lora import LoRAConfig
from grape_lightning.models.teacher import load_teacher
from grape_lightning.rewards import NumericMatch
from grape_lightning.rollout import RolloutDataModule, SamplingParams
from tests.conftest import TINY_CONFIG, tiny_spec

TEMPERATURE = 0.7
# Another architecture and size than the student's: only the tokenizer is shared.
TEACHER_CONFIG = {**TINY_CONFIG, "hidden_size": 48, "num_hidden_layers": 3, "model_type": "llama"}
TEACHER = tiny_spec(dtype="float64", init_seed=1, config=TEACHER_CONFIG)


class RecordingRollouts(OnPolicyDistillationModule):
    """Keeps each training rollout."""

    def setup(self, stage: str) -> None:
        self.rollouts, self.students = [], []

    def update(self, rollout):
        self.rollouts.append(rollout)
        super().update(rollout)


class Recording(RecordingRollouts):
    """Keeps each training rollout and the student's weights that took its update."""

    def update(self, rollout):
        self.students.append(copy.deepcopy(self.policy).eval())
        super().update(rollout)


def _module(cls=OnPolicyDistillationModule, **kwargs):
    options = dict(
        policy=tiny_spec(dtype="float64"), teacher=TEACHER, rewards=[NumericMatch()], accuracy="numeric_match",
        sampling=SamplingParams(max_new_tokens=5, temperature=TEMPERATURE), optimizer=OptimizerConfig(lr=1e-2),
        update=UpdateConfig(micro_batch_size=5),
    )
    return cls(**{**options, **kwargs})


def _datamodule():
    return RolloutDataModule(task=ArithmeticTask(num_train=64, num_val=8), group_size=4, batch_size=4)


def _trainer(tmp_path, max_steps, **kwargs):
    options = dict(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**options, **kwargs})


def sampled_token_logprobs(model, rollout, temperature):
    """log softmax(logits / T) of each response token, by a plain forward of the whole sequence."""
    ids, attention = rollout.input_ids, rollout.attention_mask
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits.double()
    logprobs = torch.log_softmax(logits[:, :-1] / temperature, dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.where(rollout.response_mask[:, 1:], logprobs, 0.0)


@pytest.mark.parametrize("discount, reward_coef", [(0.0, 0.0), (1.0, 0.5)])
def test_teacher_scores_the_sampled_tokens_and_the_logged_kl_is_the_token_mean(discount, reward_coef, tmp_path):
    module = _module(Recording, discount=discount, reward_coef=reward_coef)
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, _datamodule())
    assert trainer.global_step == 2 and len(module.rollouts) == 2
    rollout, student = module.rollouts[-1], module.students[-1]
    teacher = sampled_token_logprobs(module.teacher, rollout, TEMPERATURE)
    torch.testing.assert_close(rollout.teacher_logprobs[:, 1:], teacher, rtol=0, atol=1e-10)
    # the logged reverse KL: the token mean of l - l^T, l under the weights that took the update
    mask = rollout.response_mask[:, 1:] & (rollout.valid[:, None] if reward_coef else True)
    kl = (sampled_token_logprobs(student, rollout, TEMPERATURE) - teacher)[mask]
    assert float(trainer.callback_metrics["train/reverse_kl"]) == pytest.approx(float(kl.mean()), rel=1e-6)  # logged as float32
    assert float(kl.mean()) > 0.01  # two random models disagree: the check above is not 0 = 0
    assert ("train/advantage_abs_mean" in trainer.callback_metrics) == bool(reward_coef)


def test_teacher_is_frozen_on_the_device_and_out_of_checkpoints_and_resume_and_export_work(tmp_path):
    module = _module()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, every_n_train_steps=2)
    trainer = _trainer(tmp_path, 2, enable_checkpointing=True, callbacks=[checkpoints])
    trainer.fit(module, _datamodule())
    initial_teacher = load_teacher(TEACHER, module.tokenizer).state_dict()
    trained_teacher = module.teacher
    assert not trained_teacher.training and not any(p.requires_grad for p in trained_teacher.parameters())
    assert all(torch.equal(tensor, initial_teacher[name]) for name, tensor in trained_teacher.state_dict().items())
    assert {p.device for p in trained_teacher.parameters()} == {module.device}
    trained = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not trained & {id(p) for p in trained_teacher.parameters()}

    last = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)["state_dict"]
    assert state and not [key for key in state if key.startswith("teacher.")]
    assert all(key.startswith("policy.") for key in state)

    resumed = _module()
    trainer = _trainer(tmp_path, 3)
    trainer.fit(resumed, _datamodule(), ckpt_path=last)
    assert trainer.global_step == 3 and resumed.teacher is not None

    loaded = OnPolicyDistillationModule.load_from_checkpoint(last, rewards=[NumericMatch()])
    assert loaded.teacher is None  # export never reads the teacher
    assert all(torch.equal(tensor, state[f"policy.{name}"]) for name, tensor in loaded.policy.state_dict().items())
    assert (loaded.export_hf(tmp_path / "exported") / "model.safetensors").is_file()


def test_a_student_that_is_its_teacher_has_nothing_to_learn(tmp_path):
    module = _module(teacher=tiny_spec(dtype="float64"), update=UpdateConfig(micro_batch_size=5, max_grad_norm=None))
    before = copy.deepcopy(module.policy.state_dict())
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module, _datamodule())
    assert abs(float(trainer.callback_metrics["train/reverse_kl"])) < 1e-12
    assert abs(float(trainer.callback_metrics["train/policy_loss"])) < 1e-12
    moved = max(float((tensor - before[name]).abs().max()) for name, tensor in module.policy.state_dict().items())
    assert moved < 1e-9  # zero advantages, zero gradients: Adam (weight decay 0 here) leaves the weights


def test_a_teacher_with_another_tokenizer_is_refused_with_the_difference(tmp_path):
    tokenizer = build_char_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    teacher = tiny_spec(tokenizer=str(tmp_path / "tokenizer"))
    with pytest.raises(ValueError, match=r"does not share the student's tokenizer \(1 differences; \d+ tokens became \d+"):
        load_teacher(teacher, load_tokenizer(tiny_spec()))
    module = _module(teacher=teacher)
    with pytest.raises(ValueError, match="does not share the student's tokenizer"):  # at the start of fit, before any step
        _trainer(tmp_path, 1).fit(module, _datamodule())


@pytest.mark.parametrize("kwargs, message", [
    ({"update": UpdateConfig(epochs=2)}, "update.epochs: 1"),
    ({"rewards": None, "accuracy": None, "reward_coef": 0.5}, "reward_coef > 0 mixes in a task reward"),
    ({"rewards": None}, "accuracy 'numeric_match' names a reward function"),
    ({"discount": 1.5}, r"discount must be in \[0, 1\]"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _module(**kwargs)


def test_a_lora_teacher_is_refused():
    with pytest.raises(ValueError, match="the teacher is not trained: drop 'lora'"):
        load_teacher(tiny_spec(lora=LoRAConfig()), load_tokenizer(tiny_spec()))


def test_without_rewards_every_response_trains(tmp_path):
    module = _module(rewards=None, accuracy=None)
    trainer = _trainer(tmp_path, 1)
    trainer.fit(module, _datamodule())
    assert trainer.global_step == 1 and float(trainer.callback_metrics["train/reverse_kl"]) > 0


class TeacherOnItsDevice(RecordingRollouts):
    """Records, at each update (the Trainer moves the module back to the CPU when fit ends), the
    teacher's devices and the log-probs of a plain, eager forward of the teacher over the rollout."""

    def update(self, rollout):
        from grape_lightning.models.compile import eager_layers

        from grape_lightning.models.sharding import decoder_layers

        self.teacher_devices = {p.device.type for p in self.teacher.parameters()}
        self.teacher_compiled = all(layer._compiled_call_impl is not None for layer in decoder_layers(self.teacher.base_model))
        with eager_layers():
            self.expected = sampled_token_logprobs(self.teacher, rollout, TEMPERATURE)
        super().update(rollout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_a_gpu_the_teacher_moves_compiles_and_scores_as_a_plain_forward(tmp_path):
    """The teacher on the student's CUDA device, its decoder layers compiled with the student's
    (ModelSpec.compile unset: on for a single CUDA device), its log-probs those of a plain forward."""
    teacher = tiny_spec(init_seed=1, config=TEACHER_CONFIG)
    module = _module(TeacherOnItsDevice, policy=tiny_spec(), teacher=teacher)
    trainer = _trainer(tmp_path, 2, accelerator="gpu", devices=1)
    trainer.fit(module, _datamodule())
    assert trainer.global_step == 2
    assert module.teacher_devices == {"cuda"} and module.teacher_compiled
    assert not any(p.requires_grad for p in module.teacher.parameters())
    rollout = module.rollouts[-1]
    torch.testing.assert_close(rollout.teacher_logprobs[:, 1:].double(), module.expected, rtol=0, atol=1e-4)
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/reverse_kl"])))
