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


def test_refused_never_cuts_a_message_it_wraps_it_whole(capsys):
    remedy = "Set `llm_int8_enable_fp32_cpu_offload=True` and pass a custom `device_map` to `from_pretrained`."
    message = "Some modules are dispatched on the CPU or the disk. " * 3 + remedy + "\nsecond line: more advice"
    refused(fail(ValueError(message)), ValueError, label="from_pretrained ->")
    out = capsys.readouterr().out
    assert "..." not in out and all(len(line) <= 107 for line in out.splitlines())
    assert " ".join(out.split()) == " ".join(f"from_pretrained -> ValueError: {message}".split())
    # width= wraps narrower (never wider than a JupyterLab line) and still shows every word
    refused(fail(TypeError("an offloaded model cannot be moved: " + remedy)), TypeError, width=40, label="to ->")
    out = capsys.readouterr().out
    assert all(len(line) <= 40 for line in out.splitlines()) and out.rstrip().endswith("`from_pretrained`.")
    refused(fail(TypeError("short")), TypeError, width=200)
    assert capsys.readouterr().out == "TypeError: short\n"
    refused(fail(RuntimeError("")), RuntimeError)
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
