"""An exclusive lock on an output path, held for a run's whole life.

``with output_lock(Path("runs/int4")):`` creates ``runs/.int4.dsq-lock``, takes an exclusive
``flock`` on it and writes the holder (pid, host, start time, command line) into it. A second
process asking for the same output fails at once with :class:`OutputLockedError` naming the
holder. The kernel releases the lock when its holder dies (SIGKILL, an OOM kill), so a lock file
left behind by a dead process never blocks a later run; the file is removed when the block ends.

The lock is re-entrant within a process: a pipeline takes it before it loads the model and the
atomic write of the artifact takes it again for the same path.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dsq.core.errors import DsqInputError

LOCK_SUFFIX = ".dsq-lock"
_COMMAND_CHARS = 200  # of the holder's command line, in an error message


class OutputLockedError(DsqInputError):
    """Another process holds the lock on an output path."""


class OutputPathError(DsqInputError):
    """An output path cannot be created or written (names the path and the system's reason)."""


def output_path_error(output: Path, exc: OSError | ValueError, doing: str = "write") -> OutputPathError:
    """The error for an ``OSError`` (or the ``ValueError`` of a NUL in a path) met while writing ``output``.

    Args:
        output: the output path the caller was asked to write.
        exc: what the system raised.
        doing: the verb for the message (``write``, ``lock``, ...).

    Returns:
        An :class:`OutputPathError` naming ``output``, the system's reason and the file involved.
    """
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename not in (None, str(output)) else ""
    else:
        reason, where = str(exc), ""
    shown = str(output).replace("\0", "\\0")  # a NUL would end the message in a terminal
    return OutputPathError(f"cannot {doing} output {shown}: {reason}{where}")


def lock_path(output: Path) -> Path:
    """The lock file of ``output``: ``.NAME.dsq-lock`` beside it."""
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


@dataclass(frozen=True)
class LockHolder:
    """Who holds an output lock, as its lock file says."""

    pid: int | None
    host: str
    started: str
    command: str

    @classmethod
    def this_process(cls) -> "LockHolder":
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return cls(os.getpid(), socket.gethostname(), started, " ".join(sys.argv))

    @classmethod
    def parse(cls, raw: bytes) -> "LockHolder":
        """The holder written in a lock file; fields it lacks (a holder still writing) read as unknown."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        pid = data.get("pid")
        return cls(pid if isinstance(pid, int) else None, str(data.get("host", "?")), str(data.get("started", "?")),
                   str(data.get("command", "?")))

    def to_json(self) -> bytes:
        return (json.dumps({"pid": self.pid, "host": self.host, "started": self.started, "command": self.command}) + "\n").encode()

    def describe(self) -> str:
        command = self.command if len(self.command) <= _COMMAND_CHARS else self.command[:_COMMAND_CHARS] + "..."
        return f"pid {self.pid if self.pid is not None else '?'} on {self.host}, started {self.started}: {command}"


@dataclass
class _Held:
    fd: int
    path: Path
    created_dirs: list[Path]
    depth: int = 1


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


def _key(output: Path) -> str:
    return os.path.realpath(lock_path(output))


def holds_output_lock(output: Path) -> bool:
    """Whether this process holds the lock on ``output``."""
    try:
        key = _key(output)
    except ValueError:  # a NUL in the path: nobody holds it
        return False
    with _held_guard:
        return key in _held


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and missing parents; return the ones created, innermost first."""
    missing = []
    d = directory
    while not os.path.lexists(d) and d != d.parent:
        missing.append(d)
        d = d.parent
    if not d.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(d))
    directory.mkdir(parents=True, exist_ok=True)
    return missing


def _same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the open file ``fd`` (an unlocking holder may have removed it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    here = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _open_locked(output: Path, path: Path) -> int:
    """Open ``path`` and lock it exclusively; raise naming the holder when another process has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = LockHolder.parse(os.pread(fd, 4096, 0))
            os.close(fd)
            raise OutputLockedError(
                f"output {output} is in use by another dsq run ({holder.describe()}); lock file {path}. "
                "Wait for it to finish or choose another output"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(path, fd):
            return fd
        os.close(fd)  # the holder removed the file between our open and our lock: take the new one


def _acquire(output: Path) -> _Held:
    path = lock_path(output)
    try:
        created = _make_parents(output.parent)
    except (OSError, ValueError) as exc:
        raise output_path_error(output, exc, "create the directory of") from exc
    try:
        fd = _open_locked(output, path)
    except (OSError, ValueError) as exc:
        _remove_empty(created)
        raise output_path_error(output, exc, "lock") from exc
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, LockHolder.this_process().to_json(), 0)
    except BaseException:
        _release(_Held(fd, path, created))
        raise
    return _Held(fd, path, created)


def _remove_empty(dirs: list[Path]) -> None:
    """Remove the directories the lock created (innermost first) while they are empty."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break  # not empty (the artifact is there) or gone: the outer ones stay too


def _release(held: _Held) -> None:
    """Remove the lock file while still holding the lock, then unlock (by closing)."""
    try:
        if _same_file(held.path, held.fd):
            held.path.unlink()
    finally:
        os.close(held.fd)
        _remove_empty(held.created_dirs)


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[Path]:
    """Hold the exclusive lock on ``output`` for the block.

    Creates the parent directory of ``output`` if needed (and removes the directories it created
    if they are still empty at the end). Re-entrant within a process.

    Args:
        output: the path a run is going to write (need not exist).

    Yields:
        The lock file's path.

    Raises:
        OutputLockedError: another process holds the lock (the message names its pid, host, start
            time and command line).
        OutputPathError: the lock file cannot be created (a read-only parent, a parent that is a
            file, a NUL in the path), or ``output`` names no directory (``.``, ``..``, ``/``).
    """
    output = Path(output)
    if output.name in ("", ".", ".."):
        raise OutputPathError(f"output {output} must name the directory to write, not . or .. or /")
    try:
        key = _key(output)
    except ValueError as exc:  # a NUL in the path
        raise output_path_error(output, exc, "lock") from exc
    with _held_guard:
        held = _held.get(key)
        if held is not None:
            held.depth += 1
    if held is None:
        held = _acquire(output)
        with _held_guard:
            _held[key] = held
    try:
        yield held.path
    finally:
        with _held_guard:
            held.depth -= 1
            last = held.depth == 0
            if last:
                del _held[key]
        if last:
            _release(held)

