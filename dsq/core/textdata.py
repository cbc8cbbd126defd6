"""Reading local data sets: text, JSON and Parquet files and ``save_to_disk`` directories.

The one reader of calibration (``dsq.quantize.calibration_data``), fine-tuning
(``dsq.finetune.data``) and evaluation (``dsq.eval.data``) data. Files are read with a
``datasets`` packaged builder into memory through a throw-away cache directory, so nothing is
written to the user's cache and an edited file is always re-read; a directory is read with
``load_from_disk``. Nothing is unpickled and no remote code runs.

Every error is a :class:`~dsq.core.errors.DataError` whose message starts with the source
(``"calibration file /x.jsonl"``) and, for a bad record, names its line in a JSON-lines file
(``"train file /x.jsonl, line 7"``) or its row elsewhere (``"train directory /ds, row 6"``).

Example:
    >>> records = read_records(Path("train.jsonl").resolve(), "train", split="train")
    >>> texts = records.texts("text", "fields.text_field", skip_missing=True)
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from dsq.core.errors import DataError

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
"""File suffixes a data path may have (a directory is read with ``load_from_disk``)."""

BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}

_JSON_SUFFIXES = (".jsonl", ".json")


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide ``datasets`` progress bars for the duration, restoring the previous setting."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def short_repr(value: Any, limit: int = 100) -> str:
    """``repr(value)``, cut to ``limit`` characters (ending in ``...`` when cut)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Records:
    """The rows of one data source and how to name them in messages.

    Attributes:
        table: The rows; a ``.txt`` file is one row holding the whole file in column ``text``.
        path: The file or directory read (None for a table from elsewhere, e.g. the Hub).
        description: The source in messages, e.g. ``"train file /data/x.jsonl"``.
        is_txt: The source is a ``.txt`` file (one document; column names do not apply).
    """

    table: datasets.Dataset
    path: Path | None
    description: str
    is_txt: bool = False

    def where(self, row: int) -> str:
        """Name row ``row``: ``"<description>, line N"`` in a JSON-lines file, else ``"<description>, row N"``.

        Args:
            row: 0-based row of :attr:`table`.

        Returns:
            The source and the record's 1-based line (JSON lines) or 0-based row.
        """
        lines = _json_line_numbers(self.path, self.table.num_rows) if self.path is not None else None
        return f"{self.description}, line {lines[row]}" if lines else f"{self.description}, row {row}"

    def column(self, field: str, key: str | None) -> list[Any]:
        """The values of column ``field``, in row order.

        Args:
            field: Column name.
            key: The setting that names the column (``"fields.text_field"``), for the message.

        Raises:
            DataError: No such column (the message lists the columns there are), or a value
                is not UTF-8 text (the message names its line).
        """
        if field not in self.table.column_names:
            setting = f" ({key})" if key else ""
            raise DataError(f"{self.description} has no column {field!r}{setting}; columns: {self.table.column_names}")
        try:
            return list(self.table[field])
        except UnicodeDecodeError:  # the JSON reader keeps bytes that are not UTF-8 until a value is read
            if self.path is not None and self.path.suffix.lower() in _JSON_SUFFIXES and self.path.is_file():
                _locate_bad_line(self.path, self.description, json_records=False)
            raise DataError(f"{self.description}: column {field!r} holds text that is not UTF-8") from None

    def texts(self, field: str, key: str | None, *, skip_missing: bool) -> list[str]:
        """The strings of column ``field``, in row order (empty strings kept).

        Args:
            field: Column name.
            key: The setting that names the column, for messages.
            skip_missing: Leave out rows without a value (``None``); otherwise such a row is an error.

        Returns:
            One string per row (per row with a value when ``skip_missing``).

        Raises:
            DataError: No such column, or a value is not a string (the message names the
                record's line or row and the field).
        """
        texts: list[str] = []
        for row, value in enumerate(self.column(field, key)):
            if value is None and skip_missing:
                continue
            if not isinstance(value, str):
                setting = f" ({key})" if key else ""
                raise DataError(f"{self.where(row)}: field {field!r}{setting} must be a string, got {short_repr(value)}")
            texts.append(value)
        return texts


@dataclass(frozen=True)
class Location:
    """One record of a :class:`Records`, for messages; ``str()`` reads line numbers only when called.

    Attributes:
        records: The source.
        row: 0-based row.
        field: The column the message is about (None: the whole record).
    """

    records: Records
    row: int
    field: str | None = None

    def __str__(self) -> str:
        where = self.records.where(self.row)
        return where if self.field is None else f"{where} (field {self.field!r})"


def read_records(path: Path, what: str, split: str) -> Records:
    """Read a data file or a ``save_to_disk`` directory.

    Args:
        path: The file (``.txt``, ``.jsonl``, ``.json``, ``.parquet``) or directory.
        what: What the data is for, opening every message (``"calibration"``, ``"train"``).
        split: Split read from a ``DatasetDict`` directory.

    Returns:
        The rows, described as ``"<what> file PATH"`` or ``"<what> directory PATH"``
        (with ``" (split 'S')"`` for a ``DatasetDict``).

    Raises:
        DataError: As :func:`read_file` and :func:`read_directory`.
    """
    if path.is_dir():
        return read_directory(path, what, split)
    return _read_file(path, f"{what} file {path}", " or a directory written by datasets' save_to_disk")


def check_file(path: Path, description: str) -> None:
    """Check that ``path`` is a non-empty regular file.

    Raises:
        DataError: It does not exist, is a directory or something else, or is empty.
    """
    if not path.exists():
        raise DataError(f"{description} does not exist")
    if path.is_dir():
        raise DataError(f"{description} is a directory, not a file")
    if not path.is_file():
        raise DataError(f"{description} is neither a file nor a directory")
    if path.stat().st_size == 0:
        raise DataError(f"{description} is empty (0 bytes, 0 documents)")


def read_file(path: Path, what: str) -> Records:
    """Read a local file with a packaged builder, uncached and in memory.

    A ``.txt`` file is one row, byte for byte; ``.jsonl`` and ``.json`` files (JSON lines
    or one JSON array of objects) and ``.parquet`` files are one row per record.

    Args:
        path: The file.
        what: What the data is for, opening every message (``"benchmark"``).

    Returns:
        The rows, described as ``"<what> file PATH"``.

    Raises:
        DataError: The file is missing, empty or of another kind, or cannot be parsed (a
            line that is not JSON or not UTF-8 is named).
    """
    return _read_file(path, f"{what} file {path}", "")


def _read_file(path: Path, description: str, alternatives: str) -> Records:
    """:func:`read_file`; ``alternatives`` ends the list of supported kinds (``" or a directory ..."``)."""
    check_file(path, description)
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise DataError(
            f"{description}: unsupported suffix {suffix!r}; supported: {', '.join(SUPPORTED_SUFFIXES)}{alternatives}"
        )
    options = {"sample_by": "document"} if suffix == ".txt" else {}  # the whole file, byte for byte, in one row
    try:
        with quiet_progress(), tempfile.TemporaryDirectory(prefix="dsq-data-") as cache_dir:
            table = datasets.load_dataset(
                BUILDERS[suffix], data_files=str(path), split="train",
                cache_dir=cache_dir,  # fresh per call: an edited file is always re-read
                keep_in_memory=True, **options,
            )
    except Exception as exc:  # the builders raise many unrelated types for bad files
        if suffix != ".parquet":
            _locate_bad_line(path, description, json_records=suffix in _JSON_SUFFIXES)
        raise DataError(f"cannot read {description} as {BUILDERS[suffix]}: {exc}") from exc
    return Records(table, path, description, is_txt=suffix == ".txt")


def read_directory(path: Path, what: str, split: str) -> Records:
    """Read a ``save_to_disk`` directory; pick ``split`` from a ``DatasetDict``.

    Args:
        path: The directory.
        what: What the data is for, opening every message.
        split: Split read from a ``DatasetDict``.

    Returns:
        The rows, described as ``"<what> directory PATH"`` (``" (split 'S')"`` added for a ``DatasetDict``).

    Raises:
        DataError: The directory was not written by ``save_to_disk``, or lacks ``split``.
    """
    description = f"{what} directory {path}"
    try:
        with quiet_progress():
            loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as exc:  # FileNotFoundError for plain folders, others for damaged ones
        raise DataError(
            f"{description} is not a dataset written by datasets' save_to_disk ({exc}); "
            f"pass a file ({', '.join(SUPPORTED_SUFFIXES)}) or such a directory"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{description} has no split {split!r} (splits: {sorted(loaded)}); set split")
        return Records(loaded[split], path, f"{description} (split {split!r})")
    return Records(loaded, path, description)


def json_lines(path: Path, description: str) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed value)`` for every non-blank line of a UTF-8 JSON-lines file.

    A byte order mark before the first line is skipped, as the ``datasets`` reader does.

    Args:
        path: The file.
        description: The file in messages (``"benchmark file PATH"``).

    Yields:
        The 1-based line number and the JSON value of each non-blank line.

    Raises:
        DataError: A line that is not UTF-8 or not JSON, naming the file and the line.
    """
    with path.open("rb") as stream:
        for number, raw in enumerate(stream, start=1):
            text = _decode_line(raw, number, description)
            if not text.strip():
                continue
            yield number, _json_value(text, number, description)


def _json_value(text: str, number: int, description: str) -> Any:
    """The JSON value of line ``number``; a line that is not JSON is a :class:`DataError` naming it."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise DataError(f"{description}, line {number}: not a JSON object ({reason})") from None


def _decode_line(raw: bytes, number: int, description: str) -> str:
    try:
        return raw.decode("utf-8-sig" if number == 1 else "utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{description}, line {number}: not UTF-8 text") from None


def _locate_bad_line(path: Path, description: str, *, json_records: bool) -> None:
    """Raise a :class:`DataError` naming the first bad line of a file the builder refused.

    A line is bad when it is not UTF-8 or, in a JSON file, not JSON. A JSON file is taken
    as JSON lines when it does not open with ``[`` and some line holds a whole JSON object:
    then a line that is not an object, or that gives a field another type than an earlier
    line, is bad too; any other JSON file is parsed as one document. Returns when no bad
    line is found (the builder's own message then stands).
    """
    with path.open("rb") as stream:
        lines = [(number, _decode_line(raw, number, description)) for number, raw in enumerate(stream, start=1)]
    if not json_records:
        return
    filled = [(number, text) for number, text in lines if text.strip()]
    if filled and not filled[0][1].lstrip().startswith("[") and any(_is_json_object(text) for _, text in filled):
        _check_record_types([(number, _json_value(text, number, description)) for number, text in filled], description)
        return
    try:
        json.loads("".join(text for _, text in lines))
    except json.JSONDecodeError as exc:
        raise DataError(f"{description}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
    except RecursionError:
        raise DataError(f"{description}: not valid JSON (nested too deeply)") from None


def _check_record_types(records: list[tuple[int, Any]], description: str) -> None:
    """Name the first JSON line that is not an object, or that gives a field another type than an earlier line."""
    first: dict[str, tuple[str, int]] = {}  # field -> (JSON type, line) where it was first seen
    for number, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{description}, line {number}: not a JSON object (got {_json_type(record)})")
        for field, value in record.items():
            if value is None:
                continue
            kind, seen = first.setdefault(field, (_json_type(value), number))
            if kind != _json_type(value):
                raise DataError(
                    f"{description}, line {number}: field {field!r} is {_json_type(value)}, but {kind} on line {seen}; "
                    f"give each field one type"
                )


def _json_type(value: Any) -> str:
    kinds = (
        (type(None), "null"), (bool, "a boolean"), (int | float, "a number"), (str, "a string"), (list, "a list"),
        (dict, "an object"),
    )
    return next(name for kind, name in kinds if isinstance(value, kind))


def _is_json_object(text: str) -> bool:
    """Whether ``text`` is one whole JSON object."""
    if not text.lstrip().startswith("{"):
        return False
    try:
        json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False
    return True


def _json_line_numbers(path: Path, rows: int) -> list[int] | None:
    """The 1-based line of every record of a JSON-lines file, or None if the file is not read line by line.

    The ``datasets`` reader takes one record per non-blank line unless the file holds a JSON
    array (or one document over several lines, where the counts differ).
    """
    if path.suffix.lower() not in _JSON_SUFFIXES or not path.is_file():
        return None
    with path.open("rb") as stream:
        numbers = [number for number, raw in enumerate(stream, start=1) if raw.strip()]
        stream.seek(0)
        head = stream.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return numbers if len(numbers) == rows and not head.startswith(b"[") else None
