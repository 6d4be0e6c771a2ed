"""helpers.refusals.refused: what it prints, returns and lets through."""

import pytest

from helpers.refusals import refused


def fail(error):
    def call():
        raise error
    return call


def test_refused_prints_type_and_message_and_returns_the_error(capsys):
    e = refused(fail(ValueError("bad size\nsecond line")), ValueError)
    assert isinstance(e, ValueError)
    assert capsys.readouterr().out == "ValueError: bad size\nsecond line\n"


def test_refused_width_keeps_the_first_line_cut_as_notebook_06_did(capsys):
    refused(fail(KeyError("x" * 10 + "\nmore")), KeyError, width=5, label="generate ->")
    # str(KeyError) quotes its argument: the first line is "'xxxxxxxxxx"
    assert capsys.readouterr().out == "generate -> KeyError: 'xxxx...\n"
    refused(fail(TypeError("short")), TypeError, width=200)
    assert capsys.readouterr().out == "TypeError: short\n"
    refused(fail(RuntimeError("")), RuntimeError, width=10)
    assert capsys.readouterr().out == "RuntimeError: \n"


def test_refused_returns_none_when_nothing_is_raised(capsys):
    assert refused(lambda: 42, ValueError) is None
    assert capsys.readouterr().out == ""


def test_refused_lets_other_errors_through():
    with pytest.raises(KeyError):
        refused(fail(KeyError("k")), ValueError, TypeError)


def test_refused_catches_any_of_several_and_defaults_to_exception(capsys):
    assert isinstance(refused(fail(AttributeError("a")), RuntimeError, AttributeError), AttributeError)
    assert isinstance(refused(fail(OSError("o"))), OSError)
    assert capsys.readouterr().out == "AttributeError: a\nOSError: o\n"
