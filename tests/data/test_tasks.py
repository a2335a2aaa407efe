"""Built-in procedural tasks: determinism, split hygiene, answers, verifiers and wrong answers."""

from __future__ import annotations

import random
import re

import pytest

from grape_lightning.data.char_tokenizer import build_char_tokenizer
from grape_lightning.data.tasks import TASKS, ArithmeticTask, Example, ReverseTask, SortTask, Task, WordProblemTask, build_task

SMALL = {"num_train": 300, "num_val": 60}


@pytest.fixture(params=sorted(TASKS))
def task(request) -> Task:
    return build_task(request.param, seed=3, **SMALL)


def test_same_seed_gives_same_examples_and_other_seed_differs(task):
    again = build_task(task.name, seed=3, **SMALL)
    other = build_task(task.name, seed=4, **SMALL)
    for split in ("train", "val"):
        assert task.examples(split) == again.examples(split)
        assert task.examples(split) != other.examples(split)


def test_golden_prompts_pin_the_seeded_streams():
    # Fixed values: a process-salted hash or a changed sampler would move them.
    arithmetic, reverse = ArithmeticTask(), ReverseTask()
    assert [e.prompt for e in arithmetic.examples("val")[:3]] == ["0+73=", "71-7=", "2*14="]
    assert [e.prompt for e in arithmetic.examples("train")[:3]] == ["78*75=", "2-4=", "40+0="]
    assert [e.prompt for e in reverse.examples("val")[:2]] == ["reverse lzeasc:", "reverse akxy:"]
    assert [e.prompt for e in reverse.examples("train")[:2]] == ["reverse qfiha:", "reverse zsp:"]
    assert [e.prompt for e in SortTask().examples("val")[:2]] == ["sort pujm:", "sort mnnjn:"]
    assert [e.prompt for e in WordProblemTask().examples("val")[:2]] == [
        "Eve has 9 eggs, loses 9, finds 1. How many?", "Bob has 7 cards, sells 6, loses 1. How many?"]


def test_split_sizes_distinct_prompts_and_no_val_prompt_in_train(task):
    train, val = task.examples("train"), task.examples("val")
    assert (len(train), len(val)) == (300, 60)
    train_prompts, val_prompts = {e.prompt for e in train}, {e.prompt for e in val}
    assert len(train_prompts) == len(train) and len(val_prompts) == len(val)
    assert not train_prompts & val_prompts


def test_train_first_gives_the_same_splits_as_val_first():
    val_first = ArithmeticTask(seed=1, **SMALL)
    val_first.examples("val")
    train_first = ArithmeticTask(seed=1, **SMALL)
    assert train_first.examples("train") == val_first.examples("train")
    assert train_first.examples("val") == val_first.examples("val")


def test_examples_are_cached_and_the_returned_list_is_a_copy(task):
    first = task.examples("val")
    first.clear()
    assert len(task.examples("val")) == 60


def test_metadata_and_reference_answers_verify(task):
    for split in ("train", "val"):
        for example in task.examples(split):
            assert example.metadata == {
                "task": task.name,
                "category": task.category,
                "answer": example.answer,
                "split": split,
            }
            assert task.verify(example.answer, example.answer) == 1.0


def test_the_char_tokenizer_round_trips_every_prompt_and_answer(task):
    """The tiny models' tokenizer has an id for every character of every prompt, answer and
    rejected answer (one id per character), so nothing a task shows or expects is lost."""
    tokenizer = build_char_tokenizer()
    texts = [text for split in ("train", "val") for row in task.preference_rows(split) for text in
             (row["prompt"], row["chosen"], row["rejected"])]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text) and tokenizer.decode(ids) == text, text


def test_sft_rows(task):
    rows = task.sft_rows("val")
    assert [(r["prompt"], r["completion"]) for r in rows] == [
        (e.prompt, e.answer) for e in task.examples("val")
    ]
    assert all(set(r) == {"prompt", "completion", "metadata"} for r in rows)


def test_preference_rows_are_deterministic_and_rejected_is_wrong(task):
    rows = task.preference_rows("train")
    assert rows == build_task(task.name, seed=3, **SMALL).preference_rows("train")
    for row, example in zip(rows, task.examples("train"), strict=True):
        assert set(row) == {"prompt", "chosen", "rejected", "metadata"}
        assert (row["prompt"], row["chosen"]) == (example.prompt, example.answer)
        assert row["rejected"] != row["chosen"]
        assert task.verify(row["rejected"], row["chosen"]) == 0.0


def test_too_small_prompt_space_raises():
    # One-digit addition has exactly 100 prompts.
    ArithmeticTask(digits=1, operators="+", num_train=60, num_val=40).examples("train")
    with pytest.raises(ValueError, match="too small"):
        ArithmeticTask(digits=1, operators="+", num_train=61, num_val=40).examples("train")
    with pytest.raises(ValueError, match="too small"):
        ArithmeticTask(digits=1, operators="+", num_train=0, num_val=101).examples("val")


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_train"):
        ArithmeticTask(num_train=-1)
    with pytest.raises(ValueError, match="digits"):
        ArithmeticTask(digits=0)
    with pytest.raises(ValueError, match="operators"):
        ArithmeticTask(operators="+/")
    with pytest.raises(ValueError, match="min_length"):
        ReverseTask(min_length=5, max_length=4)
    with pytest.raises(ValueError, match="alphabet"):
        ReverseTask(alphabet="ab c")
    with pytest.raises(ValueError, match="split"):
        ReverseTask().examples("test")


def test_build_task_and_unknown_name():
    task = build_task("reverse", seed=2, num_val=5)
    assert isinstance(task, ReverseTask) and task.seed == 2 and task.num_val == 5
    with pytest.raises(ValueError, match="arithmetic, reverse, sort, word_problem"):
        build_task("sorting")


# Arithmetic


def test_arithmetic_prompts_and_answers():
    task = ArithmeticTask(digits=3, **SMALL)
    operand_lengths = set()
    for example in task.examples("train") + task.examples("val"):
        match = re.fullmatch(r"(\d+)([-+*])(\d+)=", example.prompt)
        assert match, example.prompt
        a, op, b = int(match[1]), match[2], int(match[3])
        assert str(a) == match[1] and str(b) == match[3]  # no leading zeros
        assert 0 <= a < 1000 and 0 <= b < 1000
        operand_lengths.update({len(match[1]), len(match[3])})
        assert example.answer == str({"+": a + b, "-": a - b, "*": a * b}[op])
    assert operand_lengths == {1, 2, 3}


def test_arithmetic_operators_and_non_negative_results():
    task = ArithmeticTask(operators="-", allow_negative=False, **SMALL)
    examples = task.examples("train") + task.examples("val")
    assert all("-" in e.prompt and int(e.answer) >= 0 for e in examples)
    assert any(int(e.answer) < 0 for e in ArithmeticTask(operators="-", **SMALL).examples("train"))
    assert all("*" in e.prompt for e in ArithmeticTask(operators="*", **SMALL).examples("val"))


@pytest.mark.parametrize(
    ("response", "reward"),
    [
        ("22", 1.0),
        (" 22 ", 1.0),
        ("+22", 1.0),
        ("022", 1.0),
        ("22\n5+5=10", 1.0),
        ("\n22\n", 1.0),
        ("23", 0.0),
        ("22.0", 0.0),
        ("2_2", 0.0),
        ("22 apples", 0.0),
        ("twenty-two", 0.0),
        ("", 0.0),
        ("5\n22", 0.0),
    ],
)
def test_arithmetic_verify(response, reward):
    assert ArithmeticTask().verify(response, "22") == reward


def test_arithmetic_verify_negative_answer():
    task = ArithmeticTask()
    assert task.verify("-7", "-7") == 1.0
    assert task.verify("7", "-7") == 0.0


def test_arithmetic_wrong_answer_is_near_and_respects_sign():
    task = ArithmeticTask(allow_negative=False)
    rng = random.Random(0)
    for answer in ("0", "3", "10", "81"):
        example = Example(prompt="?", answer=answer, metadata={})
        wrong = [int(task.wrong_answer(example, rng)) for _ in range(200)]
        assert all(w != int(answer) and abs(w - int(answer)) <= 10 and w >= 0 for w in wrong)
    signed = ArithmeticTask(allow_negative=True)
    wrong = {int(signed.wrong_answer(Example("?", "3", {}), rng)) for _ in range(200)}
    assert min(wrong) < 0


# Reverse


def test_reverse_prompts_and_answers():
    task = ReverseTask(min_length=2, max_length=4, alphabet="xyz", num_train=50, num_val=10)
    lengths = set()
    for example in task.examples("train") + task.examples("val"):
        match = re.fullmatch(r"reverse ([xyz]+):", example.prompt)
        assert match, example.prompt
        assert example.answer == match[1][::-1]
        lengths.add(len(match[1]))
    assert lengths == {2, 3, 4}


@pytest.mark.parametrize(
    ("response", "reward"),
    [("cba", 1.0), (" cba \nmore", 1.0), ("abc", 0.0), ("cb", 0.0), ("c b a", 0.0), ("", 0.0)],
)
def test_reverse_verify(response, reward):
    assert ReverseTask().verify(response, "cba") == reward


def test_reverse_wrong_answer_for_plain_words_and_palindromes():
    task = ReverseTask()
    rng = random.Random(0)
    assert task.wrong_answer(Example("reverse abc:", "cba", {}), rng) == "abc"
    for answer in ("aba", "aaaa", "z"):
        wrong = task.wrong_answer(Example(f"reverse {answer}:", answer, {}), rng)
        assert wrong != answer and len(wrong) == len(answer)
        assert sum(x != y for x, y in zip(wrong, answer, strict=True)) == 1
    single = ReverseTask(alphabet="a")
    assert single.wrong_answer(Example("reverse aaa:", "aaa", {}), rng) == "aaaa"


# Word problems


_WORD_PROBLEM = re.compile(r"([A-Z][a-z]+) has (\d+) ([a-z]+), ([a-z]+) (\d+), ([a-z]+) (\d+)\. How many\?")


def test_word_problem_answers_are_the_count_after_both_changes():
    """Recomputed from the words: gains add, losses subtract, and no loss takes more than is held."""
    from grape_lightning.data.tasks.word_problem import GAINS, LOSSES

    task = WordProblemTask(max_value=9, **SMALL)
    signs = set()
    for example in task.examples("train") + task.examples("val"):
        match = _WORD_PROBLEM.fullmatch(example.prompt)
        assert match, example.prompt
        held = int(match[2])
        assert 1 <= held <= 9
        for verb, amount in ((match[4], int(match[5])), (match[6], int(match[7]))):
            assert verb in GAINS + LOSSES and 1 <= amount <= 9
            assert verb in GAINS or amount <= held
            held += amount if verb in GAINS else -amount
            signs.add(verb in GAINS)
        assert example.answer == str(held)
    assert signs == {True, False}


def test_word_problem_wrong_answers_are_one_slip_away():
    task = WordProblemTask()
    rng = random.Random(0)
    example = Example("Tom has 7 pens, buys 5, gives 3. How many?", "9", {})
    # slips: 7+5 = 12, 7-5-3 = -1 (negative: left out), 7+5+3 = 15
    assert {task.wrong_answer(example, rng) for _ in range(100)} == {"12", "15"}
    lone = Example("Ann has 1 eggs, loses 1, finds 1. How many?", "1", {})  # slips: 0, 3, -1
    assert {task.wrong_answer(lone, rng) for _ in range(100)} == {"0", "3"}
    with pytest.raises(ValueError, match="not a word-problem prompt"):
        task.wrong_answer(Example("7+5=", "12", {}), rng)


@pytest.mark.parametrize(
    ("response", "reward"),
    [("9", 1.0), (" 09 \n12", 1.0), ("+9", 1.0), ("9 pens", 0.0), ("9.0", 0.0), ("nine", 0.0), ("", 0.0), ("8", 0.0)],
)
def test_word_problem_verify(response, reward):
    assert WordProblemTask().verify(response, "9") == reward


def test_word_problem_bad_arguments_raise():
    with pytest.raises(ValueError, match="max_value"):
        WordProblemTask(max_value=0)


# Sort


def test_sort_prompts_and_answers():
    task = SortTask(min_length=2, max_length=4, alphabet="xyz", num_train=50, num_val=10)
    lengths = set()
    for example in task.examples("train") + task.examples("val"):
        match = re.fullmatch(r"sort ([xyz]+):", example.prompt)
        assert match, example.prompt
        assert sorted(example.answer) == sorted(match[1])  # the same letters
        assert all(a <= b for a, b in zip(example.answer, example.answer[1:]))  # in order
        lengths.add(len(match[1]))
    assert lengths == {2, 3, 4}


@pytest.mark.parametrize(
    ("response", "reward"),
    [("abcd", 1.0), (" abcd \nmore", 1.0), ("abdc", 0.0), ("a b c d", 0.0), ("ABCD", 0.0), ("abc", 0.0), ("", 0.0)],
)
def test_sort_verify(response, reward):
    assert SortTask().verify(response, "abcd") == reward


def test_sort_wrong_answer_swaps_two_neighbours_or_changes_a_repeated_letter():
    task = SortTask()
    rng = random.Random(0)
    wrong = {task.wrong_answer(Example("sort cbba:", "abbc", {}), rng) for _ in range(100)}
    assert wrong == {"babc", "abcb"}
    for answer in ("aaa", "z"):
        changed = task.wrong_answer(Example(f"sort {answer}:", answer, {}), rng)
        assert len(changed) == len(answer) and sum(x != y for x, y in zip(changed, answer, strict=True)) == 1
    assert SortTask(alphabet="a").wrong_answer(Example("sort aa:", "aa", {}), rng) == "aaa"


def test_sort_bad_arguments_raise():
    with pytest.raises(ValueError, match="min_length"):
        SortTask(min_length=0)
    with pytest.raises(ValueError, match="alphabet"):
        SortTask(alphabet="a b")
