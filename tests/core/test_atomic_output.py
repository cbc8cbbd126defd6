"""Atomic, exclusive output writes: the lock, the no-replace move, the swap, leftovers, kills."""
import errno
import fcntl
import glob
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsq.core import atomic as artifact
from dsq.core.atomic import OutputExistsError, atomic_directory, claim_output
from dsq.quantize.artifact_save import save_weights
from dsq.core.errors import DsqInputError, Interrupted
from dsq.core.output_lock import OutputLockedError, OutputPathError, lock_path, output_lock

ROOT = Path(__file__).resolve().parents[2]
OLD = {"manifest.json": "old", "a.txt": "old-a"}
NEW = {"manifest.json": "new", "a.txt": "new-a"}


def _write(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def _read(root: Path) -> dict[str, str] | None:
    if not root.exists():
        return None
    return {str(p.relative_to(root)): p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()}


def _beside(root: Path) -> list[str]:
    """What is next to an output besides it: lock files, partial and old directories."""
    return sorted(p.name for p in root.parent.iterdir() if p.name.startswith(f".{root.name}."))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(params=["renameat2", "fallback"])
def rename_path(request, monkeypatch):
    """Every atomic_directory test runs with Linux renameat2 and with the check-then-rename fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(artifact, "_renameat2_fn", None)
    elif artifact._renameat2_fn is None:
        pytest.skip("this system has no renameat2")
    return request.param


# ----------------------------------------------------------------------------- the lock


def test_lock_held_by_another_open_file_fails_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    held = os.open(lock_path(out), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        os.write(held, json.dumps({"pid": 4242, "host": "ci-7", "started": "then", "command": "dsq run a.yaml"}).encode())
        with pytest.raises(OutputLockedError, match=r"in use by another dsq run \(pid 4242 on ci-7, started then: dsq run a.yaml\)"):
            with output_lock(out):
                pass
    finally:
        os.close(held)
    assert lock_path(out).exists()  # not ours: left as it was


def test_lock_is_reentrant_and_its_file_removed_after(tmp_path):
    out = tmp_path / "deep" / "er" / "out"
    with output_lock(out) as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["command"]
        with output_lock(out):
            assert path.exists()
        assert path.exists()  # the outer block still holds it
    assert not path.exists()
    assert not (tmp_path / "deep").exists()  # the parents it created, empty again, are removed


def test_lock_file_of_a_dead_process_does_not_block(tmp_path):
    out = tmp_path / "out"
    lock_path(out).write_text(json.dumps({"pid": _dead_pid(), "host": "x", "started": "t", "command": "c"}))
    with output_lock(out) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_lock_taken_on_a_file_its_holder_just_removed_is_retaken(tmp_path, monkeypatch):
    out = tmp_path / "out"
    path = lock_path(out)
    calls = []
    real_flock = fcntl.flock

    def flock(fd, op):
        calls.append(fd)
        if len(calls) == 1:  # the previous holder unlinks its file, a newcomer creates another
            path.unlink()
            path.write_text("")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with output_lock(out):
        assert len(calls) == 2
        assert json.loads(path.read_text())["pid"] == os.getpid()  # the file at the path is the locked one


# ----------------------------------------------------------------------------- atomic_directory


def test_new_output_appears_whole_only_at_the_end(tmp_path, rename_path):
    out = tmp_path / "out"
    with atomic_directory(out, overwrite=False) as tmp:
        _write(tmp, NEW)
        assert not out.exists() and lock_path(out).exists()
    assert _read(out) == NEW and _beside(out) == []


def test_overwrite_swaps_and_the_old_artifact_is_never_missing(tmp_path, rename_path):
    out = _write(tmp_path / "out", OLD)
    with atomic_directory(out, overwrite=True) as tmp:
        _write(tmp, NEW)
        assert _read(out) == OLD
    assert _read(out) == NEW and _beside(out) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_directory_that_appears_during_the_run_survives(tmp_path, rename_path, overwrite):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match=f"{re.escape(str(out))}.*left as it is"):
        with atomic_directory(out, overwrite=overwrite) as tmp:
            _write(tmp, NEW)
            _write(out, {"precious.txt": "keep me"})  # no manifest: not dsq's
    assert _read(out) == {"precious.txt": "keep me"} and _beside(out) == []


def test_directory_without_marker_is_never_replaced(tmp_path, rename_path):
    out = _write(tmp_path / "out", {"precious.txt": "keep me"})
    with pytest.raises(OutputExistsError, match="has no manifest.json"):
        with atomic_directory(out, overwrite=True):
            pytest.fail("the block must not run")
    assert _read(out) == {"precious.txt": "keep me"} and _beside(out) == []


def test_changed_between_check_and_swap_is_swapped_back(tmp_path, monkeypatch):
    if artifact._renameat2_fn is None:
        pytest.skip("this system has no renameat2")
    out = _write(tmp_path / "out", OLD)
    real = artifact._replaceable
    checks = []

    def replaceable(path, marker):
        checks.append(path)
        result = real(path, marker)
        if len(checks) == 2:  # between the last check and the swap, someone removes the manifest
            (out / "manifest.json").unlink()
        return result

    monkeypatch.setattr(artifact, "_replaceable", replaceable)
    with pytest.raises(OutputExistsError, match="changed during the run"):
        with atomic_directory(out, overwrite=True) as tmp:
            _write(tmp, NEW)
    assert _read(out) == {"a.txt": "old-a"} and _beside(out) == []


def test_leftovers_of_dead_runs_are_removed_and_others_only_named(tmp_path, caplog):
    out = tmp_path / "out"
    dead = tmp_path / ".out.partial-dead"
    _write(dead / "out", {"model.safetensors": "half"})
    marker = {"kind": "dsq-partial", "output": "out", "pid": _dead_pid(), "host": socket.gethostname()}
    (dead / ".dsq-partial").write_text(json.dumps(marker))
    live = _write(tmp_path / ".out.partial-live", {".dsq-partial": json.dumps({**marker, "pid": os.getppid()})})
    foreign = _write(tmp_path / ".out.partial-user", {"notes.txt": "mine"})
    other_output = _write(tmp_path / ".out.partial-x.partial-1", {".dsq-partial": json.dumps({**marker, "output": "out.partial-x"})})
    with caplog.at_level(logging.WARNING, logger="dsq.core.atomic"):
        with atomic_directory(out, overwrite=False) as tmp:
            _write(tmp, NEW)
    assert not dead.exists() and live.exists() and foreign.exists() and other_output.exists()
    assert _read(out) == NEW
    log = caplog.text
    assert f"removed {dead}" in log and f"left {foreign} as it is" in log and f"left {live} as it is" in log


@pytest.mark.parametrize("output_present", [False, True])
def test_artifact_renamed_aside_is_restored_or_removed(tmp_path, caplog, output_present):
    out = tmp_path / "out"
    aside = _write(tmp_path / ".out.old-1234", OLD)
    if output_present:
        _write(out, NEW)
    with caplog.at_level(logging.WARNING, logger="dsq.core.atomic"), claim_output(out, overwrite=True):
        assert _read(out) == (NEW if output_present else OLD)
    assert not aside.exists() and _beside(out) == []
    assert ("removed" if output_present else "restored") in caplog.text


def test_errors_and_interrupts_remove_the_temporary_directory(tmp_path, rename_path):
    out = _write(tmp_path / "out", OLD)
    for exc in (ValueError("bad"), Interrupted(signal.SIGTERM), FileNotFoundError(errno.ENOENT, "gone", "/elsewhere")):
        with pytest.raises(type(exc)):
            with atomic_directory(out, overwrite=True) as tmp:
                _write(tmp, NEW)
                raise exc
        assert _read(out) == OLD and _beside(out) == []


OS_ERRORS = {
    "parent is a file": (lambda tmp_path: tmp_path / "file" / "out", None, "Not a directory"),
    "NUL in the path": (lambda tmp_path: tmp_path / "o\0ut", None, "embedded null byte"),
    "no name": (lambda tmp_path: tmp_path / "..", None, "must name the directory"),
    "full disk": (lambda tmp_path: tmp_path / "out", errno.ENOSPC, "No space left on device"),
    "read-only file system": (lambda tmp_path: tmp_path / "out", errno.EROFS, "Read-only file system"),
    "permission denied inside": (lambda tmp_path: tmp_path / "out", errno.EACCES, "Permission denied"),
}


@pytest.mark.parametrize("case", sorted(OS_ERRORS))
def test_os_errors_name_the_output_and_the_reason(tmp_path, case):
    make, code, reason = OS_ERRORS[case]
    (tmp_path / "file").write_text("")
    out = make(tmp_path)
    shown = str(out).replace("\0", "\\0")
    with pytest.raises(OutputPathError) as caught:
        with atomic_directory(out, overwrite=False) as tmp:
            raise OSError(code, os.strerror(code), str(tmp / "model.safetensors"))
    assert shown in str(caught.value) and reason in str(caught.value)
    assert isinstance(caught.value, DsqInputError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_safetensors_write_failure_is_an_os_error_naming_the_file(tmp_path):
    import torch

    with pytest.raises(OSError) as caught:
        save_weights({"w": torch.zeros(4)}, tmp_path / "missing")
    assert caught.value.errno == errno.ENOENT and "missing" in caught.value.filename


# ----------------------------------------------------------------------------- other processes

WRITER = r"""
import os, signal, sys
from pathlib import Path
import dsq.core.atomic as artifact
from dsq.core.errors import DsqInputError

out, overwrite, point = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3]
die = lambda *_: os.kill(os.getpid(), signal.SIGKILL)
if point == "aside":  # fallback replacement: the old artifact renamed aside, the new one not yet in
    artifact._renameat2_fn = None
    rename = os.rename
    os.rename = lambda src, dst: (rename(src, dst), ".old-" in str(dst) and die())
if point == "swapped":  # the new artifact in place, the old one not yet removed
    artifact._discard_partial = die
try:
    with artifact.atomic_directory(out, overwrite) as tmp:
        if point == "start":
            die()
        (tmp / "a.txt").write_text(sys.argv[4] + "-a")
        if point == "writing":
            die()
        (tmp / "manifest.json").write_text(sys.argv[4])
        if point == "hold":
            print("inside", flush=True)
            sys.stdin.readline()
except DsqInputError as exc:
    print(exc, file=sys.stderr)
    sys.exit(2)
"""


def _writer(out: Path, overwrite: bool, point: str, content: str = "new", **kw):
    argv = [sys.executable, "-c", WRITER, str(out), "1" if overwrite else "0", point, content]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


KILL_POINTS = {
    # point: (old artifact present, what the output holds right after the SIGKILL)
    "start": (False, None),
    "writing": (False, None),
    "writing over an old one": (True, OLD),
    "swapped": (True, NEW),
    "aside": (True, None),  # the old one waits at .out.old-*: the next run puts it back first
}


@pytest.mark.parametrize("case", sorted(KILL_POINTS))
def test_sigkill_leaves_old_or_nothing_and_the_next_run_cleans_up(tmp_path, case):
    had_old, after_kill = KILL_POINTS[case]
    out = tmp_path / "out"
    if had_old:
        _write(out, OLD)
    killed = _writer(out, had_old, case.split()[0])
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert _read(out) == after_kill
    assert _beside(out)  # a leftover (and a stale lock file)
    nxt = _writer(out, True, "none")
    _, err = nxt.communicate(timeout=60)
    assert nxt.returncode == 0, err
    assert _read(out) == NEW and _beside(out) == []
    if case == "aside":
        assert "restored" in err


def test_two_concurrent_runs_one_wins_the_other_names_it(tmp_path):
    out = tmp_path / "out"
    winner = _writer(out, False, "hold", "winner", stdin=subprocess.PIPE)
    assert winner.stdout.readline() == "inside\n"
    loser = subprocess.run([sys.executable, "-m", "dsq", "run", str(ROOT / "recipes" / "demo.yaml"), f"output={out}"],
                           capture_output=True, text=True, timeout=120)
    assert loser.returncode == 2
    assert f"in use by another dsq run (pid {winner.pid} on" in loser.stderr
    winner.communicate("go\n", timeout=60)
    assert winner.returncode == 0
    assert _read(out) == {"manifest.json": "winner", "a.txt": "winner-a"} and _beside(out) == []


def test_sigterm_mid_run_exits_143_and_leaves_nothing(tmp_path, tiny_deepseek_v3):
    held = tmp_path / "held.txt"
    held.write_text("def add(a, b):\n    return a + b\n\n" * 40)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"model: {tiny_deepseek_v3}\noutput: {tmp_path / 'out'}\nprogress: false\n"
        "quantize: {method: rtn, weights: {bits: 4, group_size: 64}}\n"
        f"eval:\n  perplexity: {{data: {held}, context: 64, stride: 32}}\n  multiple_choice: null\n"
        "  fidelity: {seq_len: 32, max_tokens: 128}\n  reload_check: false\n"
    )
    run = subprocess.Popen([sys.executable, "-m", "dsq", "run", str(recipe)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not glob.glob(str(tmp_path / ".out.partial-*")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "SIGTERM" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["held.txt", "r.yaml"]


# ----------------------------------------------------------------------------- dsq validate -o


@pytest.fixture()
def validated(tmp_path, tiny_checkpoint):
    """``validate(-o DIR)`` on a tiny INT8 artifact: returns ``run(out) -> (exit code, stderr)``."""
    from dsq.cli import main
    from dsq.tools.testing import make_rtn_artifact

    art = make_rtn_artifact(tiny_checkpoint("llama"), tmp_path / "int8")
    text = tmp_path / "held.txt"
    text.write_text("def add(a, b):\n    return a + b\n\n" * 20)
    gates = tmp_path / "gates.yaml"
    gates.write_text(f"perplexity: {{data: {text}, context: 64, stride: 64}}\nmultiple_choice: null\n"
                     "fidelity: {seq_len: 32, max_tokens: 64}\ngates: {max_ppl: 100000}\n")

    def run(out: Path, capsys) -> tuple[int, str]:
        code = main([str(a) for a in ("validate", art, "--gates", gates, "-o", out, "-q")])
        return code, capsys.readouterr().err

    return run


def test_validate_output_is_replaced_whole_or_refused(tmp_path, validated, capsys, monkeypatch):
    out = tmp_path / "ci"
    code, err = validated(out, capsys)
    assert code == 0, err
    assert {".dsq-validation", "junit.xml", "summary.md", "report.json"} <= set(os.listdir(out))
    (out / "stale.txt").write_text("from the earlier validation")
    code, err = validated(out, capsys)  # again onto the same output: replaced, not merged
    assert code == 0, err
    assert not (out / "stale.txt").exists() and (out / "junit.xml").is_file()
    before = _read(out)

    import dsq.run.validate

    def full_disk(path, *args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(dsq.run.validate, "write_junit", full_disk)
    code, err = validated(out, capsys)
    assert code == 2 and f"cannot write output {out}: No space left on device" in err
    assert _read(out) == before and _beside(out) == []  # the previous output, whole; no partial one

    mine = _write(tmp_path / "mine", {"notes.txt": "not dsq's"})
    code, err = validated(mine, capsys)
    assert code == 2 and f"{mine} exists and has no .dsq-validation" in err
    assert _read(mine) == {"notes.txt": "not dsq's"}
