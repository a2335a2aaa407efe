"""``grape rubric-report`` on a real GRAPE run: a few steps of ``grape fit`` (the shipped tiny
model, a rubric with a verified item, a judged item that tracks it and one that carries no signal),
then the report from its run directory: the table against the logged metrics, the revised rubric
against the documented rule, and clear errors for a directory with nothing to report."""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

from grape_lightning.rewards.rubric import load_rubric
from tests.cli_runner import grape_here, grape_in_process

RUBRIC = """\
default_category: math
categories:
  math:
    - {name: correct, weight: 1.0, kind: verifiable, check: numeric_match}
    - {name: judged_correct, weight: 0.5, kind: judged, critic: judge, question: "Is the response the correct result?"}
    - {name: polite, weight: 0.5, kind: judged, critic: judge, question: "Is the response polite?"}
"""
ITEMS = ["math/correct", "math/judged_correct", "math/polite"]
WEIGHTS = {"math/correct": 1.0, "math/judged_correct": 0.5, "math/polite": 0.5}
STEPS = 4
CONFIG = {
    "trainer": {"max_steps": STEPS, "log_every_n_steps": 1, "val_check_interval": STEPS, "enable_progress_bar": False,
                "accelerator": "cpu", "logger": {"init_args": {"name": "grape"}}},
    "checkpoint": {"every_n_train_steps": STEPS},
    "model": {
        "class_path": "grape_lightning.algorithms.GRAPEModule",
        "init_args": {
            "policy": {"name_or_path": "grape/tiny-addition-sft"},
            "rubric": "rubric.yaml",
            "accuracy": "math/correct",
            "critics": {"judge": {"class_path": "grape_lightning.rewards.critics.CallableCritic",
                                  "init_args": {"function": "tests.cli.test_rubric_report:judge"}}},
            "sampling": {"max_new_tokens": 6, "temperature": 1.0},
            "weighting": {"mode": "reliability"},
        },
    },
    "data": {
        "class_path": "grape_lightning.rollout.RolloutDataModule",
        "init_args": {
            "task": {"class_path": "grape_lightning.data.tasks.ArithmeticTask",
                     "init_args": {"digits": 2, "operators": "+", "num_train": 64, "num_val": 8}},
            "group_size": 4, "batch_size": 4,
        },
    },
}


def judge(request):
    """``judged_correct``: sure of a number (right or not), unsure of anything else; ``polite``:
    always yes, hardly sure (no spread, low confidence: the report's two flags)."""
    text = request.response.strip()
    if request.item == "polite":
        return 1.0, 0.05, "always"
    if not text.isdigit():
        return 0.0, 0.4, "not a number"
    return (1.0 if text == request.reference else 0.3), 0.9, "a number"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The training directory, the run directory and what ``grape fit`` printed."""
    directory = tmp_path_factory.mktemp("grape_run")
    (directory / "rubric.yaml").write_text(RUBRIC)
    (directory / "grape_tiny.yaml").write_text(yaml.safe_dump(CONFIG))
    _, output = grape_here("fit", "--config", "grape_tiny.yaml", cwd=directory)
    return directory, directory / "runs" / "grape" / "version_0", output


def logged_means(run_dir, last=None):
    """Per item and statistic, the mean over the logged steps, straight from the event files."""
    events = EventAccumulator(str(run_dir), size_guidance={SCALARS: 0})
    events.Reload()
    by_step = defaultdict(dict)
    for tag in events.Tags()[SCALARS]:
        if tag.startswith("rubric/"):
            for event in events.Scalars(tag):
                by_step[event.step][tag] = event.value
    steps = [by_step[step] for step in sorted(by_step)][-(last or len(by_step)):]
    means = {}
    for item in ITEMS:
        for name in ("score", "confidence", "omega", "reward_share", "spread", "advantage_share", "agreement", "calibration_error"):
            values = [step[f"rubric/{item}/{name}"] for step in steps if f"rubric/{item}/{name}" in step]
            if values:
                means.setdefault(item, {})[name] = math.fsum(values) / len(values)
    return means, len(steps)


def table_rows(text, title):
    """The rows of the table printed under ``title``: item -> its cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if title in line)
    assert lines[start + 1].split() == ["item", "w", "score", "conf", "omega", "reward%", "spread", "adv%", "agree", "ECE", "flags"]
    return {line.split()[0]: line.split()[1:] for line in lines[start + 2 : start + 2 + len(ITEMS)]}


def check_table(rows, means):
    assert list(rows) == ITEMS
    for item, cells in rows.items():
        assert float(cells[0]) == WEIGHTS[item]
        for cell, name in zip(cells[1:9], ("score", "confidence", "omega", "reward_share", "spread", "advantage_share", "agreement",
                                           "calibration_error")):
            want = means[item].get(name)
            if want is None:
                assert cell == "-", (item, name)
            else:
                scale = 100 if name.endswith("share") else 1
                assert abs(float(cell) - scale * want) <= 5e-4 * scale + 1e-6, (item, name, cell, want)


def test_a_grape_fit_logs_every_item_statistic_and_prints_the_table(run):
    _, run_dir, output = run
    means, steps = logged_means(run_dir)
    assert steps == STEPS
    assert set(means["math/correct"]) == {"score", "confidence", "omega", "reward_share", "spread", "advantage_share"}
    assert set(means["math/judged_correct"]) == set(means["math/correct"]) | {"agreement", "calibration_error"}
    check_table(table_rows(output, f"rubric items over the {STEPS} training steps of this fit (weighting: reliability"), means)
    assert "no signal, not judged" in output.split("rubric items over")[1].splitlines()[4]  # math/polite


def _expected_weights(means, min_spread=0.01, min_confidence=0.2):
    """The documented rule: w * reliability (1 verified, else agreement, else confidence), 0 for a
    flagged item, rescaled to the category's total weight."""
    raw = {}
    for item in ITEMS:
        values = means[item]
        if values["spread"] < min_spread or values["confidence"] < min_confidence:
            raw[item] = 0.0
        else:
            raw[item] = WEIGHTS[item] * (1.0 if item == "math/correct" else values.get("agreement", values["confidence"]))
    total = sum(raw.values())
    return {item: value * sum(WEIGHTS.values()) / total for item, value in raw.items()}


def test_rubric_report_prints_the_table_and_writes_a_rubric_with_the_suggested_weights(run, tmp_path):
    _, run_dir, _ = run
    # from another directory: the run's relative rubric path is found where training ran
    written, output = grape_here("rubric-report", str(run_dir), cwd=tmp_path)
    means, steps = logged_means(run_dir)
    check_table(table_rows(output, f"over {steps} logged steps"), means)
    assert written == str(run_dir / "rubric_suggested.yaml") and f"wrote {written}" in output
    revised = load_rubric(written)
    weights = {f"{category}/{item.name}": item.weight for category, item in revised.item_keys}
    expected = _expected_weights(means)
    print(f"\n{output}")
    assert expected["math/polite"] == 0.0 and expected["math/judged_correct"] > 0.0
    assert weights == pytest.approx(expected, abs=1e-4)
    original = load_rubric(run[0] / "rubric.yaml")
    assert [(c, i.name, i.kind, i.params) for c, i in revised.item_keys] == [(c, i.name, i.kind, i.params) for c, i in original.item_keys]
    assert revised.default_category == "math"


def test_rubric_report_options_last_steps_thresholds_and_out(run, tmp_path):
    _, run_dir, _ = run
    out = tmp_path / "next" / "rubric.yaml"
    written, output = grape_here("rubric-report", str(run_dir), "--last", "2", "--min-spread", "0", "--min-confidence", "0",
                                 "--out", str(out), "--rubric", str(run[0] / "rubric.yaml"), cwd=tmp_path)
    means, steps = logged_means(run_dir, last=2)
    assert steps == 2 and written == str(out)
    check_table(table_rows(output, "over 2 logged steps"), means)
    weights = {f"{category}/{item.name}": item.weight for category, item in load_rubric(out).item_keys}
    expected = _expected_weights(means, min_spread=0.0, min_confidence=0.0)
    assert expected["math/polite"] > 0.0  # no longer flagged: weighted by its (poor) agreement
    assert weights == pytest.approx(expected, abs=1e-4)


def test_rubric_report_names_the_path_of_a_directory_with_nothing_to_report(run, tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    missing, empty, other = tmp_path / "runs" / "nothing", tmp_path / "empty", tmp_path / "sft_run"
    empty.mkdir()
    with SummaryWriter(str(other)) as writer:  # a run that logged no rubric metrics
        writer.add_scalar("train/loss", 1.0, 0)
    for directory, message in ((missing, "no such run directory"), (empty, "no TensorBoard event files"),
                               (other, "the event files hold no rubric/<category>/<item>/... metrics")):
        code, _, err = grape_in_process("rubric-report", str(directory), capsys=capsys)
        assert code == 2 and f"error: {directory}: {message}" in err, err
    code, _, err = grape_in_process("rubric-report", str(run[1]), "--rubric", str(tmp_path / "gone.yaml"), capsys=capsys)
    assert code == 2 and f"error: {tmp_path / 'gone.yaml'}: file not found" in err
