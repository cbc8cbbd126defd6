"""Artifacts: a quantized model written as a loadable HF directory, atomically.

Layout of an artifact directory::

    config.json            model config + quantization_config (compressed-tensors)
    model.safetensors      weights (quantized tensors in compressed-tensors layout)
    tokenizer*.json ...    the source tokenizer
    recipe.yaml            the resolved recipe that produced it
    report.json/.md        evaluation against the original
    manifest.json          sha256 of every other file, versions, source identity

Everything is written into a temporary sibling directory that is moved into place only when the
run has succeeded (:func:`atomic_directory`), under an exclusive lock on the output path
(:mod:`dsq.core.output_lock`): a failed or killed run leaves the previous artifact or nothing, and a
second run on the same path fails at once.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from dsq.core.errors import DsqInputError
from dsq.core.output_lock import holds_output_lock, output_lock, output_path_error

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


_OS_ERROR = re.compile(r"os error (\d+)")


class OutputExistsError(DsqInputError):
    """The output path holds something dsq may not replace (or something appeared there during the run)."""


def _replaceable(path: Path, marker: str) -> bool:
    """A directory dsq wrote (it holds ``marker``) or an empty one."""
    return path.is_dir() and ((path / marker).exists() or not any(path.iterdir()))


def prepare_output(output: Path, overwrite: bool, marker: str = MANIFEST) -> None:
    """Refuse to clobber an existing directory unless asked; never clobber one without ``marker``.

    Raises:
        OutputExistsError: ``output`` is a file, exists without ``overwrite``, or is a non-empty
            directory without ``marker``.
    """
    if not os.path.lexists(output):
        return
    if not output.is_dir():
        raise OutputExistsError(f"output {output} exists and is not a directory")
    if not overwrite:
        raise OutputExistsError(f"output directory {output} already exists; pass overwrite=true to replace it")
    if not _replaceable(output, marker):
        raise OutputExistsError(f"output directory {output} exists and has no {marker} (not written by dsq); refusing to replace it")


# ----------------------------------------------------------------------------- atomic, exclusive writes
#
# ``atomic_directory(output)`` writes into ``.NAME.partial-XXXX/NAME`` beside ``output``; the
# ``.NAME.partial-XXXX/.dsq-partial`` marker says which process made it. At the end the finished
# directory is renamed to ``output`` with RENAME_NOREPLACE (nothing that appeared there is ever
# replaced) or, to overwrite, swapped with the old artifact with RENAME_EXCHANGE, so that the old
# artifact is at ``output`` until the instant the new one is. Without renameat2 (not Linux, or a
# file system without it) the old one is first renamed aside to ``.NAME.old-XXXX``. All of it under
# :func:`dsq.core.output_lock.output_lock`, so no other run writes the same path meanwhile, and what is
# left beside ``output`` by a killed run belongs to no live run: the next run clears it.

PARTIAL_MARKER = ".dsq-partial"
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _partial_prefix(output: Path) -> str:
    return f".{output.name}.partial-"


def _old_prefix(output: Path) -> str:
    return f".{output.name}.old-"


def _libc_renameat2():
    with contextlib.suppress(OSError, AttributeError):  # no C library to open, or one without renameat2
        fn = ctypes.CDLL(None, use_errno=True).renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return fn
    return None


_renameat2_fn = _libc_renameat2()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or the file system lacks it.

    Raises:
        OSError: the rename failed (``EEXIST`` for RENAME_NOREPLACE onto an existing path).
    """
    if _renameat2_fn is None:
        return False
    if _renameat2_fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (``FileExistsError``); atomic where renameat2 is."""
    if _renameat2(src, dst, _RENAME_NOREPLACE):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def _log_removal_error(function, path, exc_info) -> None:
    log.warning("could not remove %s: %s", path, exc_info[1])


def _remove_tree(path: Path) -> None:
    """Remove a directory tree (a symlink: only the link); what cannot be removed is logged."""
    if path.is_symlink() or (os.path.lexists(path) and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, onerror=_log_removal_error)


def _discard_partial(shell: Path) -> None:
    """Remove a ``.NAME.partial-*`` directory, its marker last (a kill midway leaves it marked)."""
    if not shell.is_dir():
        return
    for child in shell.iterdir():
        if child.name != PARTIAL_MARKER:
            _remove_tree(child)
    _remove_tree(shell)


def _begin_partial(output: Path) -> tuple[Path, Path]:
    """Create ``.NAME.partial-XXXX/`` with its marker and the empty ``NAME/`` to write into."""
    shell = Path(tempfile.mkdtemp(prefix=_partial_prefix(output), dir=output.parent))
    try:
        owner = {"kind": "dsq-partial", "output": output.name, "pid": os.getpid(), "host": socket.gethostname(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (shell / PARTIAL_MARKER).write_text(json.dumps(owner) + "\n")
        inner = shell / output.name
        inner.mkdir()
    except BaseException:
        _remove_tree(shell)
        raise
    return shell, inner


def _alive_elsewhere(pid: object) -> bool:
    """Whether ``pid`` is a live process of this host other than this one."""
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _left_by_dead_run(shell: Path, output: Path) -> bool:
    """Whether ``shell`` carries a marker of a partial write of ``output`` by a process that is gone."""
    try:
        owner = json.loads((shell / PARTIAL_MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(owner, dict) or owner.get("kind") != "dsq-partial" or owner.get("output") != output.name:
        return False
    return not (owner.get("host") == socket.gethostname() and _alive_elsewhere(owner.get("pid")))


def _clear_replaced(output: Path, olds: list[Path], marker: str) -> None:
    """``.NAME.old-*``: an artifact renamed aside by a replacement that was killed before it finished."""
    ours = [p for p in olds if (p / marker).exists()]
    if not os.path.lexists(output) and len(ours) == 1:
        os.rename(ours[0], output)
        log.warning("restored %s from %s (a replacement of it was interrupted)", output, ours[0])
        ours = []
    for p in olds:
        if p in ours and os.path.lexists(output):
            _remove_tree(p)
            log.warning("removed %s: the artifact an interrupted run replaced at %s", p, output)
        else:
            log.warning("left %s as it is: it may hold an earlier artifact of %s; move it back or remove it", p, output)


def clear_leftovers(output: Path, marker: str = MANIFEST) -> list[Path]:
    """Remove what interrupted runs left beside ``output``; name (log) what dsq cannot vouch for.

    Call it while holding :func:`dsq.core.output_lock.output_lock` for ``output``: no live run then owns
    a temporary directory of that path. A ``.NAME.partial-*`` directory is removed only if it holds
    dsq's ``.dsq-partial`` marker for ``output``; an artifact renamed aside (``.NAME.old-*``) is
    moved back when ``output`` is missing, removed when ``output`` holds its replacement.

    Args:
        output: the output path.
        marker: the file that marks ``output`` as dsq's (``manifest.json``, ``export_manifest.json``).

    Returns:
        The leftovers removed or restored.
    """
    try:
        entries = sorted(output.parent.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    done, olds = [], []
    for p in entries:
        if p.name.startswith(_partial_prefix(output)) and p.is_dir() and not p.is_symlink():
            if _left_by_dead_run(p, output):
                _discard_partial(p)
                log.warning("removed %s, left by an interrupted run writing %s", p, output)
                done.append(p)
            else:
                log.warning("left %s as it is: it has no %s marker of a finished process; remove it if it is not needed",
                            p, PARTIAL_MARKER)
        elif p.name.startswith(_old_prefix(output)) and p.is_dir() and not p.is_symlink():
            olds.append(p)
    if olds:
        _clear_replaced(output, olds, marker)
        done.extend(p for p in olds if not p.exists())
    return done


@contextlib.contextmanager
def claim_output(output: Path, overwrite: bool, marker: str = MANIFEST) -> Iterator[None]:
    """Hold the lock on ``output`` for the block, having checked that ``output`` may be written.

    The first claim of a path in a process clears the leftovers of interrupted runs
    (:func:`clear_leftovers`). Take it before the long work (loading a model) so that a second run
    on the same path, or an output that may not be replaced, fails at once.

    Raises:
        OutputLockedError: another process holds ``output``.
        OutputExistsError: see :func:`prepare_output`.
        OutputPathError: the directory of ``output`` cannot be created or locked.
    """
    output = Path(output)
    first = not holds_output_lock(output)
    with output_lock(output):
        try:
            if first:
                clear_leftovers(output, marker)
            prepare_output(output, overwrite, marker)
        except OSError as exc:  # an unreadable directory, a leftover that cannot be moved back
            raise output_path_error(output, exc, "check") from exc
        yield


def _about_output(exc: OSError, shell: Path) -> bool:
    """Whether ``exc`` is a failure to write the output (a full disk, or a path under ``shell``)."""
    if exc.errno in _WRITE_ERRNOS:
        return True
    root = os.path.abspath(shell) + os.sep
    names = [f for f in (exc.filename, exc.filename2) if isinstance(f, (str, bytes, os.PathLike))]
    return any(os.path.abspath(os.fsdecode(f)).startswith(root) for f in names)


def _swap(new: Path, output: Path, marker: str) -> None:
    """Put ``new`` at ``output`` and the old artifact at ``new``; the old one stays whole throughout."""
    if not _replaceable(output, marker):
        raise OutputExistsError(f"output {output} was replaced during the run by something without {marker}; "
                                "it was left as it is and the new artifact discarded")
    if _renameat2(new, output, _RENAME_EXCHANGE):
        if not _replaceable(new, marker):  # changed between the check and the swap: put it back
            _renameat2(new, output, _RENAME_EXCHANGE)
            raise OutputExistsError(f"output {output} changed during the run and has no {marker}; "
                                    "it was left as it is and the new artifact discarded")
        return
    aside = output.parent / f"{_old_prefix(output)}{secrets.token_hex(4)}"
    os.rename(output, aside)
    try:
        os.rename(new, output)
    except BaseException:
        os.rename(aside, output)
        raise
    _remove_tree(aside)


def _install(new: Path, output: Path, overwrite: bool, marker: str) -> None:
    """Move the finished ``new`` to ``output``: never over what appeared meanwhile; a swap to overwrite."""
    if overwrite and os.path.lexists(output):
        _swap(new, output, marker)
        return
    try:
        _rename_noreplace(new, output)
    except FileExistsError:
        raise OutputExistsError(f"output {output} appeared while the run was writing it; it was left as it is "
                                "and the new artifact discarded") from None


@contextlib.contextmanager
def atomic_directory(output: Path, overwrite: bool, marker: str = MANIFEST) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``output`` only if the block succeeds.

    The block runs under :func:`claim_output` (the lock on ``output``; re-entrant). An existing
    ``output`` is replaced only with ``overwrite`` and only if it holds ``marker`` (or is empty),
    checked again at the end; the replacement is an atomic swap. Whatever ends the block (an error,
    SIGINT/SIGTERM as :class:`dsq.core.errors.Interrupted`), the temporary directory is removed and
    ``output`` is what it was.

    Args:
        output: the directory to create or replace.
        overwrite: replace an existing ``output`` that dsq wrote.
        marker: the file that marks a directory as dsq's.

    Yields:
        The empty directory to write into (``.NAME.partial-XXXX/NAME`` beside ``output``).

    Raises:
        OutputExistsError: ``output`` may not be replaced, or something appeared there during the block.
        OutputLockedError: another process holds ``output``.
        OutputPathError: a write failed (full disk, read-only file system, ...), naming ``output`` and the reason.
    """
    output = Path(output)
    with claim_output(output, overwrite, marker):
        try:
            shell, new = _begin_partial(output)
        except OSError as exc:
            raise output_path_error(output, exc) from exc
        try:
            yield new
            _install(new, output, overwrite, marker)
        except OSError as exc:
            _discard_partial(shell)
            if _about_output(exc, shell):
                raise output_path_error(output, exc) from exc
            raise
        except BaseException:
            _discard_partial(shell)
            raise
        _discard_partial(shell)  # the marker, and after a swap the replaced artifact


