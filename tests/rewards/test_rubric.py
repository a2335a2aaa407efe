"""Rubric YAML: a valid file loads; every kind of mistake names the file, line and key."""

import pytest

from grape_lightning.rewards.rubric import RubricError, load_rubric

GOOD = """\
default_category: math
categories:
  math:
    - name: correct
      weight: 1.0
      kind: verifiable
      check: numeric_match
    - name: style
      weight: 0.5
      kind: judged
      critic: local
      question: Is it short?
  code:
    - name: tests_pass
      weight: 2
      kind: verifiable
      check: unit_tests
      timeout: 3
    - name: preferred
      weight: 1
      kind: reward_model
      path: some/dir
"""


def _write(tmp_path, text):
    path = tmp_path / "rubric.yaml"
    path.write_text(text)
    return path


def test_valid_rubric_loads(tmp_path):
    rubric = load_rubric(_write(tmp_path, GOOD))
    assert list(rubric.categories) == ["math", "code"]
    assert [item.name for _, item in rubric.item_keys] == ["correct", "style", "tests_pass", "preferred"]
    assert rubric.categories["code"][0].params == {"check": "unit_tests", "timeout": 3}
    assert rubric.category_of({"category": "code"}) == "code"
    assert rubric.category_of({"category": "poetry"}) == "math"


@pytest.mark.parametrize("old, new, line, message", [
    ("weight: 1.0\n", "weight: -1\n", 5, r"categories\.math\[0\]\.weight: expected a number >= 0"),
    ("kind: judged\n", "kind: vibes\n", 10, r"categories\.math\[1\]\.kind: expected one of"),
    ("check: numeric_match\n", "check: numeric_match\n      patern: x\n", 8, r"categories\.math\[0\]\.patern: unknown key"),
    ("check: numeric_match\n", "check: regex\n", 4, r"categories\.math\[0\]: check 'regex' needs 'pattern'"),
    ("      critic: local\n", "", 8, r"categories\.math\[1\]: a judged item needs 'critic'"),
    ("    - name: style\n", "    - name: correct\n", 4, r"categories\.math: duplicate item name 'correct'"),
    ("default_category: math\n", "default_category: poetry\n", 1, r"default_category: 'poetry' is not a category"),
    ("      path: some/dir\n", "", 19, r"categories\.code\[1\]: a reward_model item needs 'path'"),
    ("      weight: 1.0\n", "", 4, r"categories\.math\[0\]: missing key 'weight'"),
])
def test_errors_name_file_line_and_key(tmp_path, old, new, line, message):
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(RubricError, match=rf"rubric\.yaml:{line}: {message}"):
        load_rubric(path)


def test_file_level_errors(tmp_path):
    with pytest.raises(RubricError, match="file not found"):
        load_rubric(tmp_path / "missing.yaml")
    with pytest.raises(RubricError, match="invalid YAML"):
        load_rubric(_write(tmp_path, "categories: [unclosed\n"))
    with pytest.raises(RubricError, match="missing key 'categories'"):
        load_rubric(_write(tmp_path, "default_category: x\n"))
    with pytest.raises(RubricError, match=r"rubric\.yaml:1: extra: unknown top-level key"):
        load_rubric(_write(tmp_path, "extra: 1\ncategories: {}\n"))
