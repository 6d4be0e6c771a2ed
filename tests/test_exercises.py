"""helpers.exercises.check_answer: the verdict printed and returned."""

from helpers.exercises import check_answer


def test_check_answer_not_answered_right_and_wrong(capsys):
    assert check_answer(None, 3, "yes", "no", "count them", label="Exercise 1") is None
    assert check_answer(3, 3, "yes", "no", "count them", label="Exercise 1") == "right"
    assert check_answer(4, 3, "yes", lambda a: f"you said {a}", "count them") == "wrong"
    assert capsys.readouterr().out.splitlines() == [
        "Exercise 1: not answered yet: count them", "Exercise 1: right: yes", "wrong: you said 4"]


def test_check_answer_predicate_and_empty_messages(capsys):
    assert check_answer(1.231, lambda a: abs(a - 1.23) < 0.006, lambda a: f"{a:.2f}x", "no") == "right"
    assert check_answer(None, "x", "", "", label="Exercise 2") is None
    assert check_answer(0, lambda s: s is False, "", "") == "wrong"  # 0 == False, but the predicate says no
    assert capsys.readouterr().out.splitlines() == ["right: 1.23x", "Exercise 2: not answered yet.", "wrong."]


def test_check_answer_calls_only_the_message_it_prints():
    def boom(_):
        raise AssertionError("the other message must not be built")
    check_answer(1, 1, "ok", boom)
    check_answer(2, 1, boom, "no")
