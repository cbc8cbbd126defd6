"""The exit-code contract of the CLI: 0 ok, 1 only for a failed gate, 2 for anything else that stops a
command (one line, no traceback unless asked), 128 + N after signal N with the clean-up done."""
import errno
import os
import signal
import time

import pytest

from dsq import cli
from dsq.core.errors import QuantizationError, RecipeError


def _fail_with(exc: BaseException):
    def command(args):
        raise exc
    return command


UNEXPECTED = [
    (RuntimeError("the kernel said no"), "RuntimeError: the kernel said no"),
    (IndexError("index 4096 is out of bounds"), "IndexError: index 4096 is out of bounds"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"),
     "/data/out/model.safetensors: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/out"), "/ro/out: Permission denied"),
    (ValueError("embedded null byte"), "ValueError: embedded null byte"),
    (MemoryError(), "out of memory"),
    (RecipeError("unknown key 'x' in r.yaml"), "dsq: error: unknown key 'x' in r.yaml"),
    (QuantizationError("tensor a.b has NaN values"), "dsq: failed: tensor a.b has NaN values"),
]


@pytest.mark.parametrize(("exc", "expected"), UNEXPECTED, ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else "")
def test_every_exception_is_one_line_and_exit_2(monkeypatch, capsys, exc, expected):
    monkeypatch.setitem(cli.COMMANDS, "recipe", _fail_with(exc))
    monkeypatch.delenv("DSQ_DEBUG", raising=False)
    code = cli.main(["recipe"])
    out, err = capsys.readouterr()
    assert code == cli.EXIT_INPUT
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_prints_the_traceback(monkeypatch, capsys, how):
    monkeypatch.setitem(cli.COMMANDS, "recipe", _fail_with(RuntimeError("boom")))
    monkeypatch.delenv("DSQ_DEBUG", raising=False)
    if how == "env":
        monkeypatch.setenv("DSQ_DEBUG", "1")
    code = cli.main(["--debug", "recipe"] if how == "flag" else ["recipe"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INPUT
    assert "Traceback" in err and "RuntimeError: boom" in err


def test_a_huge_message_is_cut(monkeypatch, capsys):
    monkeypatch.setitem(cli.COMMANDS, "recipe", _fail_with(RecipeError("x" * 10**6)))
    assert cli.main(["recipe"]) == cli.EXIT_INPUT
    err = capsys.readouterr().err
    assert len(err) < cli.MAX_MESSAGE_CHARS + 200 and "more characters" in err


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_unwinds_cleans_up_and_exits_128_plus_n(monkeypatch, capsys, tmp_path, sig, code):
    cleaned = []

    def command(args):
        try:
            os.kill(os.getpid(), sig)
            time.sleep(5)  # the handler interrupts this
            raise AssertionError("the signal was not delivered")
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setitem(cli.COMMANDS, "recipe", command)
    assert cli.main(["recipe"]) == code
    assert cleaned == [True]
    assert f"interrupted by {sig.name}" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before  # handlers are restored


@pytest.mark.parametrize(("argv", "message"), [
    (["export", "x", "--threads", "0"], "--threads: must be at least 1"),
    (["export", "x", "--threads", "two"], "--threads: not an integer"),
    (["export", "x", "--tolerance", "-1"], "--tolerance: must be a positive finite number"),
    (["export", "x", "--tolerance", "nan"], "--tolerance: must be a positive finite number"),
    (["plan", "x", "--tflops", "inf"], "--tflops: must be a positive finite number"),
])
def test_bad_options_exit_2_naming_the_option(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == cli.EXIT_INPUT
    assert message in capsys.readouterr().err


def test_export_options_beyond_the_schema_exit_2_before_loading(tmp_path, capsys):
    code = cli.main(["export", "dsq/assets/tiny_deepseek_v3", "-o", str(tmp_path / "x"), "--threads", "5000"])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INPUT
    assert "'threads' in dsq export options" in err and "4096" in err
    assert not (tmp_path / "x").exists() and "Loading weights" not in err


def test_validate_refuses_an_output_inside_the_artifact(tmp_path, capsys):
    art = tmp_path / "art"
    art.mkdir()
    code = cli.main(["validate", str(art), "-o", str(art / "ci")])
    assert code == cli.EXIT_INPUT
    assert "is inside the artifact" in capsys.readouterr().err
    assert list(art.iterdir()) == []
