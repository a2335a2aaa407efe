"""The real ``grape`` command on every shipped config: fit, export, help. In this process, but for
the multi-process run (a subprocess, as a launcher starts it)."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from grape_lightning.callbacks.learning_guard import NoLearningSignalError
from grape_lightning.models.loading import load_tokenizer
from tests.cli_runner import ROOT, grape_here, grape_in_process


def grape(*args, cwd, expect=0):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "grape_lightning.cli", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    output = f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert result.returncode == expect, f"{' '.join(args)}: exit {result.returncode}\n{output}"
    return result


def assert_exported_model_generates(directory: Path) -> None:
    """What a user does with an exported directory: files readable as the umask allows, and
    ``AutoTokenizer`` + ``AutoModelForCausalLM`` generating a left-padded batch exactly as each
    prompt alone."""
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o777 & ~umask
    for path in directory.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory).eval()
    assert tokenizer.padding_side == "left"
    prompts = ["12+34=", "7+5="]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # the shorter prompt is padded on the left
    with torch.no_grad():
        together = model.generate(**batch, max_new_tokens=4, do_sample=False)[:, batch["input_ids"].shape[1]:]
        for row, prompt in enumerate(prompts):
            alone = tokenizer(prompt, return_tensors="pt")
            expected = model.generate(**alone, max_new_tokens=4, do_sample=False)[0, alone["input_ids"].shape[1]:]
            assert together[row, : len(expected)].tolist() == expected.tolist(), prompt


def export_elsewhere(checkpoint: Path, tmp_path: Path) -> Path:
    """``grape export`` run from a directory other than the training one, with relative paths."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    directory, output = grape_here("export", "--ckpt_path", os.path.relpath(checkpoint, elsewhere), "--output_dir", "exported",
                                   cwd=elsewhere)
    assert "exported" in output and Path(directory) == elsewhere / "exported"
    return elsewhere / "exported"


def test_help_and_print_config(capsys):
    code, help_text, _ = grape_in_process("fit", "--help", capsys=capsys)
    assert code == 0 and "--config" in help_text
    code, printed, _ = grape_in_process("fit", "--config", str(ROOT / "configs/sft.yaml"), "--print_config", capsys=capsys)
    config = yaml.safe_load(printed)
    assert code == 0 and config["model"]["class_path"] == "grape_lightning.algorithms.SFTModule"
    assert config["data"]["init_args"]["task"]["class_path"] == "grape_lightning.data.tasks.ArithmeticTask"


RL_TAGS = {
    "ppo": {"train/value_loss", "train/explained_variance", "train/approx_kl", "train/value_clip_fraction", "train/kl_coef",
            "train/advantage_std", "train/return_mean"},
    "ppo_reward_model": {"train/reward_scale", "train/value_loss", "train/explained_variance"},
    "grpo": {"train/clip_fraction_low", "train/clip_fraction_high", "train/tied_groups", "train/entropy"},
    "dapo": {"train/clip_fraction_low", "train/clip_fraction_high", "train/tied_groups", "train/entropy", "train/reward/overlong_punishment"} | {
        f"train/dynamic_sampling/{name}" for name in ("rounds", "prompts_generated", "kept_groups", "filled_groups", "sampled_reward", "sampled_accuracy")},
    "gspo": {"train/clip_fraction_low", "train/clip_fraction_high", "train/ratio_mean", "train/tied_groups", "train/entropy"},
    "cispo": {"train/clip_fraction_low", "train/clip_fraction_high", "train/ratio_mean", "train/tied_groups", "train/entropy"},
    "reinforce": {"train/advantage_abs_mean", "train/entropy"},
    # KL to the reference: pi_old recomputed, so the sampler/trainer mismatch is logged too
    "reinforce_pp": {"train/advantage_abs_mean", "train/entropy", "train/kl", "train/mismatch_kl", "train/mismatch_ratio_max", "train/mismatch_abs_max"},
    "rloo": {"train/advantage_abs_mean", "train/entropy", "train/kl", "train/mismatch_kl", "train/mismatch_ratio_max", "train/mismatch_abs_max"},
    "distill": {"train/reverse_kl", "train/policy_loss", "train/entropy"},
    "rejection_sampling": {"train/kept_fraction", "train/nll"},
    "trpo": {"train/kl_after_step", "train/surrogate_improvement", "train/expected_improvement", "train/cg_residual",
             "train/cg_iterations", "train/line_search_tries", "train/accepted"},
}


def test_grpo_under_two_process_ddp_finishes_and_exports(tmp_path):
    """Each rank samples its own prompts; callbacks that write files must not deadlock the ranks."""
    override = {"data": {"init_args": {"task": {"init_args": {"num_train": 64, "num_val": 16}}}}}
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    grape(
        "fit", "--config", str(ROOT / "configs/grpo.yaml"), "--config", "override.yaml",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
        "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
        cwd=tmp_path,
    )
    assert (tmp_path / "runs" / "grpo" / "version_0" / "hf" / "model.safetensors").is_file()


def test_a_run_whose_rewards_cannot_be_computed_stops_with_the_cause(tmp_path):
    """Prompts without the ``answer`` NumericMatch reads: no reward is valid, no optimizer step can
    happen, and max_steps would never be reached. The run stops after the default 20 batches."""
    rows = [{"prompt": f"{a}+{b}=", "category": "math"} for a in range(10) for b in range(4)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    override = {
        "trainer": {"max_steps": 5, "logger": False, "enable_progress_bar": False, "callbacks": []},
        "data": {"init_args": {"task": None, "train_file": "prompts.jsonl", "batch_size": 4, "group_size": 2}},
    }
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    with pytest.raises(NoLearningSignalError) as stopped:
        grape_here("fit", "--config", str(ROOT / "configs/grpo.yaml"), "--config", "override.yaml", cwd=tmp_path)
    message = str(stopped.value)
    print(f"\n{message}")
    assert message.startswith("GRPOModule: 20 consecutive rollout batches without an optimizer step (at step 0)")
    assert "8 of 8 rewards were invalid (None/NaN/inf); missing values by reward function: 'numeric_match' 8" in message
    assert "'metadata': {'category': 'math', 'source': 'prompts.jsonl:" in message  # the row, by file and line


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def local_model(tmp_path_factory) -> Path:
    """A model directory as ``save_pretrained`` writes one for a real model, built offline: a
    byte-level BPE tokenizer trained on a few strings, with a chat template, and a tiny Qwen2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    directory = tmp_path_factory.mktemp("local_model")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = [f"user\n{a}+{b}=\nassistant\n{a + b}" for a in range(0, 100, 3) for b in range(0, 100, 7)]
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.save_pretrained(directory)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    return directory


CONFIGS = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))
ON_POLICY = {*RL_TAGS, "grape"}
RL_COMMON_TAGS = {"train/reward", "train/reward_std", "train/tied_groups", "train/group_reward_std", "train/reward/numeric_match", "train/response_length",
                  "train/generation_tokens_per_s", "train/invalid_rewards", "val/accuracy", "val/reward"}
TAGS = {
    **{algorithm: RL_COMMON_TAGS | tags for algorithm, tags in RL_TAGS.items()},
    "grape": {"critic_failures", "val/accuracy", "train/reward"} | {
        f"rubric/math/{item}/{name}" for item in ("correct", "plain_number", "pleasing") for name in ("score", "confidence", "spread", "failures")},
    "sft": {"train/loss", "train/token_accuracy", "train/tokens_per_s", "val/loss", "val/accuracy"},
    "dpo": {"train/loss", "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen", "val/rewards/chosen", "val/accuracy"},
    "reward_model": {"train/loss", "train/accuracy", "train/margin", "val/accuracy", "val/margin"},
}


def test_every_config_has_its_expected_metrics():
    assert sorted(TAGS) == CONFIGS


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_trains_a_local_model_named_by_one_flag_and_exports_it(config, local_model, tmp_path):
    """Each shipped config through the real command, two optimizer steps, with the README's
    one-flag change: ``--model.init_args.policy '{"name_or_path": ...}'`` (the reward model's spec is
    ``model``) replaces the YAML's model, tiny-model fields included; the tokenizer and its chat
    template follow the model. Then: the algorithm's metrics, the run summary, ``last.ckpt`` (the
    on-policy runs replace trainer.callbacks, and the checkpoint section stays), HFExport's
    directory, and ``grape export`` from another directory (GRAPE's relative rubric path resolved
    as in training) giving a model that generates with the trained module's exact logits."""
    override = {
        "trainer": {"max_steps": 2, "val_check_interval": 2, "log_every_n_steps": 1, "enable_progress_bar": False},
        "checkpoint": {"every_n_train_steps": 2},
        "data": {"init_args": {"task": {"init_args": {"num_train": 32, "num_val": 8}}}},
    }
    if config in ON_POLICY:
        override["trainer"]["callbacks"] = [
            {"class_path": "grape_lightning.callbacks.SampleTable", "init_args": {"every_n_steps": 1}},
            {"class_path": "grape_lightning.callbacks.HFExport"},
            {"class_path": "grape_lightning.callbacks.RunSummary"},
        ]
    if config == "grape":
        (tmp_path / "rubrics").mkdir()
        shutil.copy(ROOT / "configs/rubrics/arithmetic.yaml", tmp_path / "rubrics" / "arithmetic.yaml")
        override["model"] = {"init_args": {"rubric": "rubrics/arithmetic.yaml"}}
    if config == "distill":  # the teacher scores the student's token ids: it follows the student to the same tokenizer
        override["model"] = {"init_args": {"teacher": {"name_or_path": str(local_model)}}}
    (tmp_path / "override.yaml").write_text(yaml.safe_dump(override))
    spec = "model" if config == "reward_model" else "policy"
    cli, output = grape_here("fit", "--config", str(ROOT / f"configs/{config}.yaml"), "--config", "override.yaml",
                             f"--model.init_args.{spec}", json.dumps({"name_or_path": str(local_model)}), cwd=tmp_path)
    run = tmp_path / "runs" / config / "version_0"
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert TAGS[config] <= scalars, sorted(TAGS[config] - scalars)
    assert "val/accuracy: before " in output and "TensorBoard logs:" in output
    if config == "grape":
        assert " -> after 0." in output
    if config in ON_POLICY:
        assert "initial policy: val/accuracy" in output
        assert [event.step for event in events.Scalars("val/accuracy")][0] == 0  # the initial policy
        assert "samples/text_summary" in events.Tags()["tensors"]
    else:
        assert any(tag.startswith("lr-") for tag in scalars)  # the base's LearningRateMonitor
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"] == 2
    trained = AutoTokenizer.from_pretrained(run / "hf")
    assert trained.chat_template == CHAT_TEMPLATE and len(trained) == len(AutoTokenizer.from_pretrained(local_model))
    exported = export_elsewhere(checkpoint, tmp_path)
    if config == "reward_model":  # a sequence classifier with one score
        scorer = AutoModelForSequenceClassification.from_pretrained(exported)
        assert scorer(**AutoTokenizer.from_pretrained(exported)(["12+34=46"], return_tensors="pt")).logits.shape == (1, 1)
        return
    # (AutoTokenizer reads this BPE tokenizer saved beside a qwen2 config as Qwen2Tokenizer, which
    # encodes otherwise and pads on the right: the export warns and the library's loader reads it as
    # saved. The shipped models' exports are checked with AutoTokenizer by test_docs' quickstart.)
    ids = torch.tensor([cli.model.tokenizer("12+34=")["input_ids"]])
    for directory in (exported, run / "hf"):
        assert load_tokenizer(str(directory))("12+34=")["input_ids"] == ids[0].tolist()
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        assert model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, cli.model.policy.eval()(ids).logits, rtol=0, atol=0)


def test_naming_a_model_source_on_the_command_line_clears_the_other_and_is_idempotent():
    from grape_lightning.model_source_args import replace_model_sources

    mapping = replace_model_sources(["fit", "--model.init_args.policy", '{"name_or_path": "x", "dtype": "bfloat16"}'])
    assert json.loads(mapping[2]) == {"name_or_path": "x", "dtype": "bfloat16", "config": None, "tokenizer": None}
    assert replace_model_sources(mapping) == mapping  # what a multi-process launcher runs again
    kept = replace_model_sources(["fit", "--p={name_or_path: x, tokenizer: t}"])
    assert json.loads(kept[2]) == {"name_or_path": "x", "tokenizer": "t", "config": None}
    built = replace_model_sources(["fit", "--p", '{"config": {"model_type": "qwen2"}, "tokenizer": "grape/char"}'])
    assert json.loads(built[2])["name_or_path"] is None
    dotted = replace_model_sources(["fit", "--p.name_or_path", "x", "--p.tokenizer", "t", "--print_config"])
    assert dotted == ["fit", "--p.name_or_path", "x", "--p.config", "null", "--p.tokenizer", "null", "--p.tokenizer", "t", "--print_config"]
    untouched = ["fit", "--config", "a.yaml", "--trainer.max_steps", "3", "--data.init_args.task", '{"class_path": "T"}', "--print_config=comments"]
    assert replace_model_sources(untouched) == untouched


def test_ckpt_path_picks_the_run_directory_of_the_logger(tmp_path):
    from jsonargparse import Namespace

    from grape_lightning.resume import continue_run

    def trainer(version=None):
        logger = Namespace(class_path="TensorBoardLogger", init_args=Namespace(save_dir=str(tmp_path / "runs"), name="grpo", version=version))
        return Namespace(logger=logger)

    fresh = trainer()
    continue_run(fresh, "last")
    assert fresh.logger.init_args.version is None  # no run yet: the first one starts version_0
    for version in (0, 1, 3):
        (tmp_path / "runs" / "grpo" / f"version_{version}" / "checkpoints").mkdir(parents=True)
    (tmp_path / "runs" / "grpo" / "version_x").mkdir()
    latest, chosen, pinned, new = trainer(), trainer(), trainer(version=7), trainer()
    continue_run(latest, "last")
    continue_run(chosen, str(tmp_path / "runs" / "grpo" / "version_1" / "checkpoints" / "last.ckpt"))
    continue_run(pinned, "last")
    continue_run(new, None)
    assert [t.logger.init_args.version for t in (latest, chosen, pinned, new)] == [3, 1, 7, None]
