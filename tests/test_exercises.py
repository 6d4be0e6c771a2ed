"""helpers.exercises.check_answer: the verdict printed and returned, and every check able to say "wrong"."""

import ast
from pathlib import Path

import pytest

from helpers.exercises import check_answer

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def test_check_answer_not_answered_right_and_wrong(capsys):
    assert check_answer(None, 3, "yes", "no", "count them", wrong_example=2, label="Exercise 1") is None
    assert check_answer(3, 3, "yes", "no", "count them", wrong_example=2, label="Exercise 1") == "right"
    assert check_answer(4, 3, "yes", lambda a: f"you said {a}", "count them", wrong_example=2) == "wrong"
    assert capsys.readouterr().out.splitlines() == [
        "Exercise 1: not answered yet: count them", "Exercise 1: right: yes", "wrong: you said 4"]


def test_check_answer_predicate_and_empty_messages(capsys):
    assert check_answer(1.231, lambda a: abs(a - 1.23) < 0.006, lambda a: f"{a:.2f}x", "no",
                        wrong_example=1.3) == "right"
    assert check_answer(None, "x", "", "", wrong_example="y", label="Exercise 2") is None
    # 0 == False, but the predicate says no
    assert check_answer(0, lambda s: s is False, "", "", wrong_example=True) == "wrong"
    assert capsys.readouterr().out.splitlines() == ["right: 1.23x", "Exercise 2: not answered yet.", "wrong."]


def test_check_answer_calls_only_the_message_it_prints():
    def boom(_):
        raise AssertionError("the other message must not be built")
    check_answer(1, 1, "ok", boom, wrong_example=2)
    check_answer(2, 1, boom, "no", wrong_example=2)


def test_a_check_that_accepts_its_wrong_example_is_refused():
    with pytest.raises(ValueError, match="accepts the wrong answer 5"):
        check_answer(None, lambda kl: 0 < kl < 10, "", "", wrong_example=5)
    with pytest.raises(ValueError, match="accepts the wrong answer None"):
        check_answer(None, 3, "", "", wrong_example=None)


def test_every_exercise_check_in_the_notebooks_names_a_wrong_answer():
    """Each notebook run tests its checks with their wrong example; here: every call passes one."""
    calls = []
    for src in sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py")):
        for node in ast.walk(ast.parse(src.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "check_answer":
                calls.append((src.name, node.lineno, {k.arg for k in node.keywords}))
    assert len(calls) >= 7, calls
    missing = [f"{name}:{line}" for name, line, kw in calls if "wrong_example" not in kw]
    assert not missing, f"check_answer without wrong_example= (a plausible wrong answer): {missing}"
