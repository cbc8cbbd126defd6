"""The typed schema's ground floor: strict sections, bounded value types, and one-line error messages.

Recipes, gates files, method settings and ``dsq export`` options all validate through pydantic
models built on :class:`Strict`; :func:`format_errors` turns a validation error into lines that name
the dotted key, the file and what was given.
"""
from __future__ import annotations

import re
import reprlib
import typing
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

SEED_MAX = 2**32 - 1  # numpy, torch and random all take a seed in [0, 2**32 - 1]


MAX_SEQUENCE = 1 << 20  # longest token sequence any setting may ask for


MAX_TOKEN_BUDGET = 1 << 32  # largest token budget (tokens read from a data set)


MAX_COUNT = 1 << 30  # largest step, sample or item count


MAX_WIDTH = 1 << 16  # largest group, block, batch or rank size


MAX_ERRORS_SHOWN = 5  # validation errors listed in one message


MAX_MESSAGE_CHARS = 3000  # an error message never exceeds this, whatever the input


def _short(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters, whatever its size or depth."""
    short = reprlib.Repr()
    short.maxlevel, short.maxdict, short.maxlist, short.maxtuple, short.maxset = 2, 4, 4, 4, 4
    short.maxstring, short.maxother, short.maxlong = 80, 80, 40
    return short.repr(value)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("must not contain a NUL character")
    return value


def _compiles(pattern: str) -> str:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise ValueError(f"invalid module pattern {_short(pattern)}: {exc}") from None
    return pattern


Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


PathText = Annotated[str, Field(max_length=4096), AfterValidator(_not_blank)]  # a file or directory path


Name = Annotated[str, Field(max_length=256), AfterValidator(_not_blank)]  # a column, split or data set name


Pattern = Annotated[str, Field(max_length=1000), AfterValidator(_compiles)]  # a module-name regular expression


class Strict(BaseModel):
    """Base of every section: unknown keys, coerced types (``"4"`` for 4, ``1.0`` for 1) and NaN/inf are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True, allow_inf_nan=False)


def _members(annotation: Any) -> tuple[list[type[BaseModel]], str | None]:
    """The section classes an annotation admits (one, or the members of a union, ``None`` aside), and the
    union's discriminator field when it is a discriminated union (``Annotated[Union[...], Field(discriminator=)]``)."""
    members: list[type[BaseModel]] = []
    discriminator = None
    for arg in typing.get_args(annotation) or (annotation,):
        if typing.get_origin(arg) is typing.Annotated:
            discriminator = next((m.discriminator for m in arg.__metadata__ if isinstance(getattr(m, "discriminator", None), str)), None)
            arg = typing.get_args(arg)[0]
        inner = typing.get_args(arg) if typing.get_origin(arg) is typing.Union else (arg,)
        members += [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
    return members, discriminator


def _tagged(members: list[type[BaseModel]], discriminator: str, tag: object) -> type[BaseModel] | None:
    """The member of a discriminated union whose ``discriminator`` field defaults to ``tag``."""
    return next((m for m in members if m.model_fields[discriminator].default == tag), None)


def _walk(root: type[BaseModel], loc: tuple) -> tuple[tuple, type[BaseModel] | None]:
    """``loc`` without the tags pydantic inserts after a discriminated union, and the section it ends in.

    ``('quantize', 'gptq', 'gptq', 'damp')`` -> ``('quantize', 'gptq', 'damp')``: the first ``gptq``
    is the tag choosing the union member, the second the member's ``gptq`` settings.
    """
    model: type[BaseModel] | None = root
    out: list = []
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        out.append(part)
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            model = None
            continue
        members, discriminator = _members(field.annotation)
        if discriminator is not None and parts:
            model = _tagged(members, discriminator, parts.pop(0))
        else:
            model = members[0] if len(members) == 1 else None
    return tuple(out), model


def _allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the section at ``loc`` (the parent of the offending key), walking down from ``root``."""
    _, model = _walk(root, loc)
    return sorted(model.model_fields) if model is not None else []


def _key_path(loc: tuple) -> str:
    """``('quantize', 'weights', 'bits')`` -> ``quantize.weights.bits`` (each part cut to 80 characters)."""
    parts = [str(p) if len(str(p)) <= 80 else str(p)[:77] + "..." for p in loc]
    return ".".join(parts) or "(top level)"


def format_errors(exc: ValidationError, source: str, root: type[BaseModel]) -> str:
    """One line per validation error: the dotted key path, ``source``, what is wrong and what was given.

    Args:
        exc: The pydantic error.
        source: The file (and overrides) the values came from.
        root: The model validated: unknown keys list the keys allowed at their place.

    Returns:
        At most ``MAX_ERRORS_SHOWN`` lines, each with the given value cut short; at most
        ``MAX_MESSAGE_CHARS`` characters in all.
    """
    errors = exc.errors()
    lines = []
    for err in errors[:MAX_ERRORS_SHOWN]:
        raw = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if err["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(root, raw[:-1]))
            lines.append(f"unknown key '{_key_path(_walk(root, raw)[0])}' in {source}; allowed keys here: {allowed}")
        elif err["type"] == "union_tag_invalid":  # an unknown method name: say which ones exist
            ctx = err.get("ctx", {})
            path = _key_path(_walk(root, raw)[0] + (ctx.get("discriminator", "").strip("'"),))
            lines.append(f"invalid value for '{path}' in {source}: Input should be {ctx.get('expected_tags')} "
                         f"(got {_short(ctx.get('tag'))})")
        else:
            path = _key_path(_walk(root, raw)[0])
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"invalid value for '{path}' in {source}: {message} (got {_short(err.get('input'))})")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"... and {len(errors) - MAX_ERRORS_SHOWN} more errors in {source}")
    return _cut("\n".join(lines), MAX_MESSAGE_CHARS)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
