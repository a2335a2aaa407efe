"""TRPO: conjugate gradient, the line search, the losses against float64 loops, Fisher-vector
products against an explicit float64 Fisher and KL Hessian, the trust region on every accepted
step, exact restoration after a rejected search, frozen parameters, step counting and resume."""

from __future__ import annotations

import copy
import math
import random

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from grape_lightning.advantages import AdvantageConfig, compute_advantages
from grape_lightning.algorithms.trpo import TRPOModule
from grape_lightning.algorithms.trust_region_rows import hidden_rows, response_rows
from grape_lightning.algorithms.update_loop import UpdateConfig
from grape_lightning.data.tasks import ArithmeticTask
from grape_lightning.losses.trpo import categorical_kl, mean_token_kl, trpo_surrogate
from grape_lightning.models.logprobs import positions_from_mask
from grape_lightning.natural_gradient import (
    TrustRegionConfig,
    assign_, backtracking_line_search, conjugate_gradient, step_gradients, trust_region_step,
)
from grape_lightning.rewards import RewardFunction
from grape_lightning.rollout import RolloutDataModule, SamplingParams
from tests.conftest import tiny_spec

F64 = torch.float64


class LengthParity(RewardFunction):
    """A reward a random tiny model already varies on: 1 for responses of odd length."""

    def __call__(self, prompts, responses, metadata):
        return [float(len(r) % 2) for r in responses]


def _datamodule(**kwargs):
    return RolloutDataModule(**{"task": ArithmeticTask(num_train=64, num_val=8), "group_size": 4, "batch_size": 4, **kwargs})


def _trainer(tmp_path, max_steps, **kwargs):
    options = dict(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
    )
    return L.Trainer(**{**options, **kwargs})


def _module(**kwargs) -> TRPOModule:
    options = dict(
        rewards=[LengthParity()], sampling=SamplingParams(max_new_tokens=4),
        update=UpdateConfig(micro_batch_size=5, logprob_chunk_size=7),
    )
    return TRPOModule(kwargs.pop("policy", tiny_spec()), **{**options, **kwargs})


def _advantages(module: TRPOModule, rollout):
    return compute_advantages(module.advantage, rollout.rewards, rollout.groups, rollout.valid).advantages


def _rollout(module: TRPOModule, **datamodule_options):
    datamodule = _datamodule(**datamodule_options)
    datamodule.set_tokenizer(module.tokenizer)
    datamodule.setup()
    return module.collect_rollout(next(iter(datamodule.train_dataloader())))


# ----------------------------------------------------------------------------------------------
# Conjugate gradient, step size, line search
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_conjugate_gradient_solves_random_spd_systems_to_tolerance(seed):
    generator = torch.Generator().manual_seed(seed)
    n = 10 + 10 * seed
    basis, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=generator))
    eigenvalues = torch.logspace(-1, 2, n, dtype=F64)  # condition number 1000
    matrix = basis @ torch.diag(eigenvalues) @ basis.T
    b = torch.randn(n, dtype=F64, generator=generator)
    tolerance = 1e-10
    result = conjugate_gradient(lambda v: matrix @ v, b, max_iterations=10 * n, tolerance=tolerance)
    true_residual = float((b - matrix @ result.solution).norm() / b.norm())
    assert result.residual <= tolerance
    assert true_residual <= 10 * tolerance
    assert result.iterations <= 10 * n
    torch.testing.assert_close(result.solution, torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-8)


def test_conjugate_gradient_stops_at_the_iteration_limit_and_on_zero_right_hand_side():
    matrix = torch.diag(torch.arange(1.0, 21.0, dtype=F64))
    b = torch.ones(20, dtype=F64)
    limited = conjugate_gradient(lambda v: matrix @ v, b, max_iterations=3, tolerance=1e-12)
    assert limited.iterations == 3 and limited.residual > 1e-12
    assert limited.residual == pytest.approx(float((b - matrix @ limited.solution).norm() / b.norm()), rel=1e-9)
    zero = conjugate_gradient(lambda v: matrix @ v, torch.zeros(20, dtype=F64), max_iterations=3)
    assert zero.iterations == 0 and zero.residual == 0.0 and not zero.solution.any()


def test_trust_region_step_lies_on_the_quadratic_boundary():
    generator = torch.Generator().manual_seed(0)
    root = torch.randn(6, 6, dtype=F64, generator=generator)
    fisher = root @ root.T + 0.1 * torch.eye(6, dtype=F64)
    direction = torch.randn(6, dtype=F64, generator=generator)
    step = trust_region_step(direction, direction @ fisher @ direction, max_kl=0.02)
    assert float(0.5 * step @ fisher @ step) == pytest.approx(0.02, rel=1e-12)
    assert float(step @ direction) > 0


def test_line_search_accepts_the_first_step_inside_the_region_that_improves():
    measured = {1.0: (0.05, 0.3), 0.5: (0.009, -0.1), 0.25: (0.004, 0.2), 0.125: (0.001, 0.1)}
    tried = []

    def evaluate(fraction):
        tried.append(fraction)
        return measured[fraction]

    result = backtracking_line_search(evaluate, max_kl=0.01, factor=0.5, max_tries=4)
    assert tried == [1.0, 0.5, 0.25]  # too far; inside but worse; accepted
    assert (result.accepted, result.fraction, result.tries, result.kl, result.improvement) == (True, 0.25, 3, 0.004, 0.2)
    rejected = backtracking_line_search(lambda fraction: (0.02, 1.0), max_kl=0.01, factor=0.5, max_tries=3)
    assert (rejected.accepted, rejected.fraction, rejected.tries) == (False, 0.0, 3)
    assert (rejected.kl, rejected.improvement) == (0.0, 0.0)


def bits(tensor):
    """The tensor's bit pattern (torch.equal takes -0.0 for 0.0)."""
    return tensor.view({torch.bfloat16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[tensor.dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_sgd_with_the_step_as_gradient_lands_bit_for_bit_where_the_line_search_measured(dtype):
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2, 2)]
    base = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    base[0][0, :2] = torch.tensor([-0.0, 0.0])  # signed zeros must survive a rejected step
    step = torch.randn(sum(math.prod(shape) for shape in shapes), dtype=torch.float32, generator=generator) * 1e-3
    step[:3] = 0.0
    parameters = [torch.nn.Parameter(tensor.clone()) for tensor in base]
    optimizer = torch.optim.SGD(parameters, lr=1.0)
    for fraction in (1.0, 0.5**3):
        with torch.no_grad():
            assign_(parameters, base, step, fraction)  # the line search's trial point
            trial = [bits(p).clone() for p in parameters]
            assign_(parameters, base)
        step_gradients(parameters, step, fraction)
        optimizer.step()
        assert all(torch.equal(bits(p), q) for p, q in zip(parameters, trial))
        # and that point is theta_old + alpha Delta, each piece of alpha Delta rounded to the parameter's dtype
        pieces = (fraction * step.double()).split([math.prod(shape) for shape in shapes])
        for p, start, piece in zip(parameters, base, pieces):
            expected = start.double() + piece.view(start.shape).to(dtype).double()
            torch.testing.assert_close(p.detach().double(), expected.to(dtype).double(), rtol=0, atol=0)
    with torch.no_grad():
        assign_(parameters, base)
    step_gradients(parameters, None)  # a rejected search: the optimizer step leaves theta_old
    optimizer.step()
    assert all(torch.equal(bits(p), bits(q)) for p, q in zip(parameters, base))


# ----------------------------------------------------------------------------------------------
# Losses against float64 loops
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_surrogate_matches_a_loop(seed):
    rng = random.Random(seed)
    batch, time = rng.randint(2, 6), rng.randint(3, 8)
    logprobs = [[rng.uniform(-3, 0) for _ in range(time)] for _ in range(batch)]
    old = [[rng.uniform(-3, 0) for _ in range(time)] for _ in range(batch)]
    advantages = [rng.uniform(-2, 2) for _ in range(batch)]
    mask = [[int(rng.random() < 0.7) for _ in range(time)] for _ in range(batch)]
    mask[0][0] = 1
    tokens = sum(map(sum, mask))
    expected = math.fsum(
        math.exp(logprobs[i][t] - old[i][t]) * advantages[i] for i in range(batch) for t in range(time) if mask[i][t]
    ) / tokens
    logprobs, old, advantages, mask = (torch.tensor(x, dtype=F64) for x in (logprobs, old, advantages, mask))
    mask = mask.bool()
    surrogate, _ = trpo_surrogate(logprobs, old, advantages, mask)
    assert surrogate.item() == pytest.approx(expected, abs=1e-12)
    same, _ = trpo_surrogate(logprobs, old, advantages[:, None].expand(batch, time), mask)  # per-token advantages
    assert same.item() == pytest.approx(expected, abs=1e-12)
    halves = [  # micro-batches add up to the batch when given its token count
        trpo_surrogate(logprobs[rows], old[rows], advantages[rows], mask[rows], num_tokens=tokens)[0]
        for rows in (slice(0, 1), slice(1, None))
    ]
    assert sum(halves).item() == pytest.approx(expected, abs=1e-12)


def test_mean_token_kl_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    old = torch.log_softmax(torch.randn(3, 4, 7, dtype=F64, generator=generator), -1)
    new = torch.log_softmax(torch.randn(3, 4, 7, dtype=F64, generator=generator), -1)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]], dtype=torch.bool)
    per_token = [
        math.fsum(math.exp(old[i, t, v]) * (old[i, t, v] - new[i, t, v]) for v in range(7))
        for i in range(3) for t in range(4)
    ]
    torch.testing.assert_close(categorical_kl(old, new).flatten(), torch.tensor(per_token, dtype=F64), rtol=0, atol=1e-14)
    expected = math.fsum(kl for kl, on in zip(per_token, mask.flatten().tolist()) if on) / 8
    assert mean_token_kl(old, new, mask).item() == pytest.approx(expected, abs=1e-14)
    assert mean_token_kl(old, old, mask).item() == pytest.approx(0.0, abs=1e-15)


def test_response_rows_align_with_old_logprobs_and_accept_per_token_advantages():
    module = _module()
    rollout = _rollout(module)
    rows = torch.arange(len(rollout))
    advantages = _advantages(module, rollout)
    per_sequence = response_rows(rollout, rows, advantages, 5)
    per_token = response_rows(rollout, rows, advantages[:, None].expand_as(rollout.response_mask).clone(), 5)
    assert len(per_sequence) == 4  # 16 sequences in micro-batches of 5
    for batch, same in zip(per_sequence, per_token):
        torch.testing.assert_close(batch.advantages, same.advantages, rtol=0, atol=0)
        hidden, tokens = hidden_rows(module.policy, batch.inputs)
        logprobs = module.log_pi(hidden).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(logprobs, batch.old_logprobs, rtol=0, atol=1e-5)  # rho = 1 at theta_old
    assert sum(len(batch) for batch in per_sequence) == int(rollout.trained_mask.sum())


# ----------------------------------------------------------------------------------------------
# Fisher-vector products against an explicit float64 Fisher and KL Hessian
# ----------------------------------------------------------------------------------------------

def relative_error(ours, reference) -> float:
    return float((ours - reference).norm() / reference.norm())


# a small subset of the parameters, in model order
TRAINED = ["model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.v_proj.bias", "model.norm.weight"]


def test_fisher_vector_product_equals_explicit_fisher_and_kl_hessian():
    module = _module(policy=tiny_spec(dtype="float64"), sampling=SamplingParams(max_new_tokens=4, temperature=0.8))
    for name, parameter in module.policy.named_parameters():
        parameter.requires_grad_(name in TRAINED)
    rollout = _rollout(module, batch_size=3, group_size=2)
    rows = torch.arange(len(rollout))
    batches = response_rows(rollout, rows, _advantages(module, rollout), module.update_config.micro_batch_size)
    assert len(batches) == 2  # two micro-batches, several LM-head chunks each
    parameters = module.trainable_parameters()
    named = dict(module.policy.named_parameters())
    assert [id(p) for p in parameters] == [id(named[name]) for name in TRAINED]

    # The reference: the whole model as a function of the trained parameters (flattened), full
    # logits, no chunks and no micro-batches; attention by the math kernel, which vmap and double
    # backward support.
    reference = copy.deepcopy(module.policy)
    fixed = {name: tensor.detach() for name, tensor in reference.named_parameters()}
    shapes = [fixed[name].shape for name in TRAINED]
    sizes = [fixed[name].numel() for name in TRAINED]
    theta = torch.cat([fixed[name].reshape(-1) for name in TRAINED])
    inputs = rollout.model_inputs(rows)
    scored = inputs["response_mask"][:, 1:].bool()
    temperature = module.sampling.logprob_temperature

    def log_distributions(flat):  # [N, V]: log pi_theta(. | s_t) at every response token
        pieces = {name: piece.view(shape) for name, piece, shape in zip(TRAINED, flat.split(sizes), shapes)}
        logits = functional_call(reference, {**fixed, **pieces}, (), {
            "input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
            "position_ids": positions_from_mask(inputs["attention_mask"]),
        }).logits
        return torch.log_softmax(logits[:, :-1][scored] / temperature, dim=-1)

    with sdpa_kernel(SDPBackend.MATH):
        old = log_distributions(theta).detach()
        num_tokens = old.shape[0]
        jacobian = torch.autograd.functional.jacobian(log_distributions, theta, vectorize=True)  # [N, V, P]
        # F = (1/N) sum_t E_{v ~ pi(. | s_t)} [grad l_v grad l_v^T]
        fisher = torch.einsum("nv,nvi,nvj->ij", old.exp(), jacobian, jacobian) / num_tokens
        mean_kl = lambda flat: (old.exp() * (old - log_distributions(flat))).sum() / num_tokens  # noqa: E731
        hessian = torch.autograd.functional.hessian(mean_kl, theta)

    # Qwen2's RMSNorm computes in float32 even in a float64 model: agreement to ~1e-8, not 1e-15.
    assert relative_error(hessian, fisher) < 1e-6
    for seed in range(3):
        vector = torch.randn(theta.numel(), dtype=F64, generator=torch.Generator().manual_seed(seed))
        product = module.kl_hessian_vector_product(batches, parameters, vector, float(sum(map(len, batches))))
        assert relative_error(product, fisher @ vector) < 1e-6
        assert relative_error(product, hessian @ vector) < 1e-6


# ----------------------------------------------------------------------------------------------
# The update inside Lightning
# ----------------------------------------------------------------------------------------------


def exact_mean_token_kl(old_policy, policy, rollout, temperature) -> float:
    """KL-bar(pi_old || pi_theta) over the trained tokens, from full logits of two whole models."""
    inputs = rollout.model_inputs(torch.arange(len(rollout)))
    scored = (inputs["response_mask"] & rollout.valid[:, None])[:, 1:].bool()
    arguments = dict(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        position_ids=positions_from_mask(inputs["attention_mask"]),
    )
    with torch.no_grad():
        old = torch.log_softmax(old_policy(**arguments).logits[:, :-1][scored] / temperature, -1)
        new = torch.log_softmax(policy(**arguments).logits[:, :-1][scored] / temperature, -1)
    return float((old.exp() * (old - new)).sum(-1).mean())


class RecordingTRPO(TRPOModule):
    """Measures, independently of the module, what each update did."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.records = []

    def update(self, rollout):
        before = copy.deepcopy(self.policy)
        accepted_before = int(self.accepted_updates)
        super().update(rollout)
        metrics = self.trainer.callback_metrics
        accepted = int(self.accepted_updates) > accepted_before
        self.records.append({
            "accepted": accepted,
            # the SGD step lands exactly on the point the line search accepted (its last trial)
            "step_is_last_trial": accepted and all(
                torch.equal(bits(p), bits(q)) for p, q in zip(self.trainable_parameters(), self.last_trial)
            ),
            "kl": exact_mean_token_kl(before, self.policy, rollout, self.sampling.logprob_temperature),
            "logged_kl": float(metrics["train/kl_after_step"]),
            "tries": float(metrics["train/line_search_tries"]),
        })

    def kl_and_surrogate(self, batches, old_head, num_tokens):
        moved = any(not torch.equal(p, q) for p, q in zip(self.trainable_parameters(), self.start))
        self.records.append({"trial_moved": moved})
        self.last_trial = [p.detach().clone() for p in self.trainable_parameters()]
        return super().kl_and_surrogate(batches, old_head, num_tokens)

    def on_train_start(self):
        self.start = [p.detach().clone() for p in self.trainable_parameters()]


FROZEN = ("model.embed_tokens.", "model.layers.0.")


def test_every_accepted_step_keeps_the_measured_kl_within_delta_and_frozen_parameters_stay(tmp_path):
    max_kl = 0.02
    module = RecordingTRPO(
        tiny_spec(dtype="float64"), rewards=[LengthParity()], sampling=SamplingParams(max_new_tokens=4),
        trust_region=TrustRegionConfig(max_kl=max_kl, damping=1e-3), update=UpdateConfig(micro_batch_size=6),  # little damping: full steps land near or past delta
    )
    for name, parameter in module.policy.named_parameters():
        parameter.requires_grad_(not name.startswith(FROZEN))
    initial = {name: tensor.detach().clone() for name, tensor in module.policy.named_parameters()}
    trainer = _trainer(tmp_path, 5)
    trainer.fit(module, _datamodule())

    assert trainer.global_step == 5  # one step per update
    (optimizer,) = trainer.optimizers  # the step is applied by SGD with lr 1 on the trained parameters only
    assert type(optimizer) is torch.optim.SGD and len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (1.0, 0, 0, False)
    assert [id(p) for p in group["params"]] == [id(p) for p in module.trainable_parameters()]
    updates = [record for record in module.records if "kl" in record]
    assert len(updates) == 5 and sum(record["accepted"] for record in updates) >= 3
    assert any(record["tries"] > 1 for record in updates)  # the search had to backtrack
    for record in updates:
        if record["accepted"]:
            assert record["step_is_last_trial"]
            assert 0 < record["kl"] <= max_kl
            assert record["logged_kl"] == pytest.approx(record["kl"], rel=1e-6)  # float32 RMSNorm inside
        else:
            assert record["kl"] == 0.0
    for name, tensor in module.policy.named_parameters():
        if name.startswith(FROZEN):
            assert torch.equal(tensor, initial[name]), name
    assert all(not torch.equal(t, initial[n]) for n, t in module.policy.named_parameters() if not n.startswith(FROZEN))


def test_a_rejected_line_search_restores_the_parameters_bit_for_bit(tmp_path):
    module = RecordingTRPO(
        tiny_spec(), rewards=[LengthParity()], sampling=SamplingParams(max_new_tokens=4), trust_region=TrustRegionConfig(line_search_tries=3)
    )
    module.trust_region.max_kl = -1.0  # KL >= 0 > max_kl: no step can be accepted
    initial = [tensor.detach().clone() for tensor in module.policy.state_dict().values()]
    trainer = _trainer(tmp_path, 2)
    trainer.fit(module, _datamodule())

    assert trainer.global_step == 2
    assert all(record["trial_moved"] for record in module.records if "trial_moved" in record)
    assert [record["tries"] for record in module.records if "tries" in record] == [3.0, 3.0]
    assert float(trainer.callback_metrics["train/accepted"]) == 0.0
    for before, after in zip(initial, module.policy.state_dict().values()):
        assert torch.equal(before, after)


def test_invalid_options_are_refused():
    refused = (
        {"trust_region": {"max_kl": 0.0}}, {"trust_region": {"line_search_factor": 1.0}}, {"trust_region": {"line_search_tries": 0}}, {"advantage": {"baseline": "gae"}},
        {"update": {"epochs": 2}}, {"update": {"mini_batch_size": 4}},
    )
    for options in refused:
        with pytest.raises(ValueError):
            _module(**options)


def test_resume_mid_run_reproduces_the_uninterrupted_run(tmp_path):
    def make():
        L.seed_everything(0)
        return _module(advantage=AdvantageConfig(baseline="leave_one_out", scaling="none"), trust_region=TrustRegionConfig(fisher_sample_size=8))

    full = make()
    initial = [p.detach().clone() for p in full.policy.parameters()]
    _trainer(tmp_path / "full", 4).fit(full, _datamodule())
    assert any(not torch.equal(a, b) for a, b in zip(initial, full.policy.parameters()))
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    _trainer(tmp_path / "a", 2, callbacks=[checkpoint], enable_checkpointing=True).fit(make(), _datamodule())
    resumed = make()
    trainer = _trainer(tmp_path / "b", 4)
    trainer.fit(resumed, _datamodule(), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert trainer.global_step == 4
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=True)
    assert saved["optimizer_states"][0]["param_groups"][0]["lr"] == 1.0  # resumed with its optimizer
    for ours, reference in zip(resumed.state_dict().values(), full.state_dict().values()):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
