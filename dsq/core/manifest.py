"""Manifests: the sha256 of every file in an artifact or export directory, and their verification.

A dsq artifact holds ``manifest.json`` and an ONNX export ``export_manifest.json``; in both, ``files``
maps the path of each file, relative to the directory and written with ``/``, to its sha256 (64 lower-case
hex digits). The manifest covers the whole directory: every file under it, in every subdirectory, except
the manifest itself. A subdirectory with a manifest of its own (the ``onnx/`` export a recipe's
``export:`` section writes into the artifact) is written before the artifact's manifest, so its files,
its manifest included, are listed in the artifact's manifest too; it verifies on its own as well.

A directory verifies when:

* the manifest is UTF-8 JSON whose ``files`` maps paths to sha256 digests;
* every listed path is plain and relative (no absolute path, no ``.`` or ``..`` part, no empty part)
  and resolves inside the directory;
* the directory holds only regular files and directories (no symbolic link, no device, socket or pipe);
* the files under the directory are exactly the listed ones (none missing, none added);
* every file's sha256 is the listed one.

A file written into a directory after its manifest must be added with :func:`extend_manifest`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from dsq import __version__
from dsq.core.atomic import MANIFEST, MANIFEST_VERSION
from dsq.core.check import Check
from dsq.core.errors import DsqInputError

EXPORT_MANIFEST = "export_manifest.json"
MANIFEST_NAMES = (MANIFEST, EXPORT_MANIFEST)  # looked for in this order
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def versions() -> dict[str, str]:
    import torch
    import transformers

    found = {"dsq": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
             "python": platform.python_version()}
    with contextlib.suppress(ImportError):
        import compressed_tensors

        found["compressed_tensors"] = compressed_tensors.__version__
    return found


@dataclass(frozen=True)
class Manifest:
    files: dict[str, str]  # relative path -> sha256
    versions: dict[str, str]
    source: dict
    extra: dict

    def to_dict(self) -> dict:
        return {"version": MANIFEST_VERSION, "kind": "dsq-artifact", "files": self.files,
                "versions": self.versions, "source": self.source, **self.extra}


def write_manifest(root: Path, source: dict, extra: dict | None = None) -> Manifest:
    """Hash every file under ``root``, recursively (except ``root/manifest.json``), and write ``manifest.json``.

    Call it last: :func:`dsq.core.manifest.verify_manifest` refuses a file added afterwards.

    Raises:
        ArtifactIntegrityError: ``root`` holds a symbolic link or a special file (named).
    """

    files = {name: sha256_file(root / name) for name in directory_files(root, exclude=MANIFEST)}
    manifest = Manifest(files=files, versions=versions(), source=source, extra=extra or {})
    (root / MANIFEST).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return manifest


class ArtifactIntegrityError(DsqInputError):
    """The directory does not match its manifest (a file missing, added, changed or outside it), or the
    manifest itself is unusable; the message names the file."""


def find_manifest(root: Path) -> Path:
    """The manifest of ``root``: ``manifest.json`` of an artifact, else ``export_manifest.json`` of an export.

    Raises:
        ArtifactIntegrityError: ``root`` has neither (it is not a dsq artifact or export).
    """
    for name in MANIFEST_NAMES:
        path = root / name
        if path.is_symlink():
            raise ArtifactIntegrityError(f"{path}: a symbolic link; a manifest must be a regular file")
        if path.is_file():
            return path
    raise ArtifactIntegrityError(f"{root}: no {MANIFEST} or {EXPORT_MANIFEST}; not a dsq artifact")


def read_manifest_files(path: Path) -> dict[str, str]:
    """The ``files`` map of the manifest at ``path``, checked for form (not yet against the directory).

    Returns:
        Relative path -> sha256 hex digest.

    Raises:
        ArtifactIntegrityError: the manifest is not UTF-8 JSON, has no ``files`` object, or an entry is not
            a path mapped to a 64-hex-digit sha256 (the entry is named).
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactIntegrityError(f"{path}: not UTF-8 text (byte {exc.start}); not a manifest dsq wrote") from None
    except OSError as exc:
        raise ArtifactIntegrityError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ArtifactIntegrityError(f"{path}: not valid JSON ({exc})") from None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict) or not files:
        raise ArtifactIntegrityError(f"{path}: 'files' must be a non-empty object mapping file paths to sha256 digests")
    for name, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ArtifactIntegrityError(
                f"{path}: entry {name!r} has digest {_short(digest)}; a sha256 is 64 lower-case hex digits"
            )
    return files


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def check_entry(root: Path, name: str, manifest: Path) -> Path:
    """The file a manifest entry names, once the entry is known to be a plain path inside ``root``.

    Raises:
        ArtifactIntegrityError: an absolute path, a ``.``/``..``/empty part, a backslash or NUL, or a path
            that resolves outside ``root`` (through a symbolic link).
    """
    pure = PurePosixPath(name)
    plain = (
        bool(name) and "\\" not in name and "\x00" not in name and not pure.is_absolute()
        and pure.as_posix() == name and not any(part in (".", "..") for part in pure.parts)
    )
    if not plain:
        raise ArtifactIntegrityError(
            f"{manifest}: entry {_short(name)} is not a plain relative path inside {root} "
            "(absolute paths and '.' or '..' parts are refused)"
        )
    path = root / name
    if not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactIntegrityError(f"{manifest}: entry {_short(name)} resolves to {path.resolve()}, outside {root}")
    return path


def directory_files(root: Path, exclude: str) -> list[str]:
    """Every regular file under ``root``, recursively, as sorted ``/``-separated relative paths.

    Args:
        root: the directory.
        exclude: a file name at the top of ``root`` to leave out (the manifest).

    Raises:
        ArtifactIntegrityError: a symbolic link, or an entry that is neither a file nor a directory
            (named); a directory that cannot be listed.
    """
    found: list[str] = []
    pending = [root]
    while pending:
        directory = pending.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as exc:
            raise ArtifactIntegrityError(f"{directory}: cannot be listed ({exc.strerror or exc})") from None
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                raise ArtifactIntegrityError(f"{path}: a symbolic link; an artifact holds regular files only")
            if entry.is_dir(follow_symlinks=False):
                pending.append(path)
            elif entry.is_file(follow_symlinks=False):
                found.append(path.relative_to(root).as_posix())
            else:
                raise ArtifactIntegrityError(f"{path}: not a regular file; an artifact holds regular files only")
    return sorted(f for f in found if f != exclude)


def _more(names: list[str]) -> str:
    return f"; {len(names) - 1} more: {', '.join(names[1:4])}{' ...' if len(names) > 4 else ''}" if len(names) > 1 else ""


def _digest(path: Path) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise ArtifactIntegrityError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def verify_manifest(root: Path) -> Check:
    """Verify that ``root`` is exactly what its manifest lists (see the module docstring).

    Args:
        root: a dsq artifact (``manifest.json``) or ONNX export (``export_manifest.json``) directory.

    Returns:
        A passed :class:`~dsq.eval.ci.Check` named after the manifest.

    Raises:
        ArtifactIntegrityError: no manifest, an unusable one, or the first difference found, naming the
            file: an entry outside the directory, a symbolic link or special file, a listed file missing,
            a file not listed, a file whose sha256 differs.
    """
    manifest = find_manifest(root)
    listed = read_manifest_files(manifest)
    for name in sorted(listed):
        check_entry(root, name, manifest)
    present = set(directory_files(root, exclude=manifest.name))
    missing, added = sorted(set(listed) - present), sorted(present - set(listed))
    if missing:
        raise ArtifactIntegrityError(f"{root / missing[0]}: listed in {manifest.name} but missing{_more(missing)}")
    if added:
        raise ArtifactIntegrityError(
            f"{root / added[0]}: not listed in {manifest.name} (added after the artifact was written){_more(added)}"
        )
    for name, digest in sorted(listed.items()):
        if _digest(root / name) != digest:
            raise ArtifactIntegrityError(
                f"{root / name}: sha256 differs from {manifest.name} (the file changed after it was written)"
            )
    return Check(f"integrity ({manifest.name})", True,
                 f"sha256 of all {len(listed)} files match; no file missing, none added")


def extend_manifest(root: Path, names: list[str]) -> None:
    """Add files just written into ``root`` to its manifest (a report written after an export, say).

    Args:
        root: a directory with a manifest.
        names: paths relative to ``root`` of files that exist.

    Raises:
        ArtifactIntegrityError: ``root`` has no usable manifest, or a name is not a plain path inside it.
    """
    manifest = find_manifest(root)
    read_manifest_files(manifest)
    data = json.loads(manifest.read_text(encoding="utf-8"))
    for name in names:
        data["files"][name] = _digest(check_entry(root, name, manifest))
    manifest.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
