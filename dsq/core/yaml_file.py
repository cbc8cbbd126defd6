"""Reading YAML files a user wrote (recipes, gates files, overrides): strict and bounded.

The loader refuses duplicate keys (naming the line), deep nesting and alias expansion beyond small
limits, and reads YAML 1.2 floats such as ``1e-4``; every message is cut to a few lines.
"""
from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import yaml

from dsq.core.errors import RecipeError
from dsq.core.schema import _cut, _key_path, _short

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few kilobytes; this refuses a wrong file early


MAX_YAML_DEPTH = 32  # recipes nest 4 levels deep


MAX_YAML_ALIASES = 100  # aliases (``*name``) per document


MAX_YAML_NODES = 10_000  # nodes after aliases are expanded (a "billion laughs" document has 10**9)


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing what a recipe never needs and a hostile file uses.

    Duplicate keys (YAML keeps the last one silently), nesting deeper than ``MAX_YAML_DEPTH``, more
    than ``MAX_YAML_ALIASES`` aliases, and aliases that expand to more than ``MAX_YAML_NODES`` nodes
    or refer to themselves are :class:`RecipeError` naming ``source`` and the line.
    """

    def __init__(self, text: str, source: str) -> None:
        super().__init__(text)
        self.source = source
        self.depth = 0
        self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_YAML_ALIASES:
                line = self.peek_event().start_mark.line + 1
                raise RecipeError(f"{self.source}, line {line}: more than {MAX_YAML_ALIASES} YAML aliases (*name); a recipe needs few")
            return super().compose_node(parent, index)
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise RecipeError(f"{self.source}, line {line}: nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may be overridden: that is what merging is for
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                seen = key in first_line
            except TypeError:  # an unhashable key: the base class reports it
                continue
            if seen:
                raise RecipeError(
                    f"{self.source}, line {line}: duplicate key {_short(key)} (first at line {first_line[key]}); "
                    "YAML would silently keep only the last value"
                )
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2 floats without a dot (``1e-4``, ``3E+2``): PyYAML (YAML 1.1) reads them as strings
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse aliases that expand to more than ``MAX_YAML_NODES`` nodes or contain themselves.

    Sizes are counted once per node (aliases share nodes), so a "billion laughs" document is
    refused in microseconds instead of being expanded.
    """
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        children = _children(node)
        if finished:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size[id(child)] for child in children)
            if size[id(node)] > MAX_YAML_NODES:
                raise RecipeError(
                    f"{source}, line {node.start_mark.line + 1}: its aliases expand to more than "
                    f"{MAX_YAML_NODES} values; a recipe has a few hundred"
                )
            continue
        if id(node) in size:
            continue
        if id(node) in on_path:
            raise RecipeError(f"{source}, line {node.start_mark.line + 1}: an alias refers to the value that contains it")
        on_path.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with the recipe loader (duplicate keys, aliases and depth checked).

    Args:
        text: The document.
        source: Where it comes from, for messages.

    Returns:
        The parsed value (``None`` for an empty document).

    Raises:
        RecipeError: Invalid YAML, a duplicate key, or a document nested or aliased beyond the limits.
    """
    try:
        loader = _RecipeLoader(text, source)  # refuses control characters at once
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_expansion(node, source)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source} is not valid YAML: {_cut(str(exc), 1000)}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], yaml-parsed value).

    Raises:
        RecipeError: No ``=``, an empty key, or a value that is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"command-line override {_short(text)} must look like key.path=value")
    if not raw.strip():  # e.g. an unset shell variable: never silently null
        raise RecipeError(f"command-line override {_short(text)} has no value; write {_cut(key.strip(), 100)}=null for null")
    return key.strip().split("."), parse_yaml(raw, f"command-line override {_short(text)}")


def apply_override(tree: dict, path: list[str], value: Any, text: str) -> None:
    """Set ``value`` at ``path`` in ``tree``, creating missing sections.

    Raises:
        RecipeError: A part of the path is a value, not a section.
    """
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"command-line override {_short(text)}: '{_key_path(tuple(path[: i + 1]))}' is not a section")
        node = child
    node[path[-1]] = value


def _read_text(path: Path, what: str) -> str:
    """The UTF-8 text of a regular file of at most ``MAX_RECIPE_BYTES``.

    Raises:
        RecipeError: Missing, a directory or other non-file, too large, unreadable or not UTF-8.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise RecipeError(f"{what} not found: {path}") from None
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
        raise RecipeError(f"cannot read {what} {_short(str(path))}: {exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise RecipeError(f"{what} {path} is a directory, not a YAML file")
    if not stat.S_ISREG(info.st_mode):
        raise RecipeError(f"{what} {path} is not a regular file")
    if info.st_size > MAX_RECIPE_BYTES:
        raise RecipeError(f"{what} {path} has {info.st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecipeError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RecipeError(f"{what} {path} is not UTF-8 text: byte 0x{data[exc.start]:02x} on line {line}") from None


def read_yaml(path: Path, what: str = "recipe file") -> dict:
    """Read a YAML mapping (a recipe, or a gates file) with every check of :func:`parse_yaml`.

    Args:
        path: The file.
        what: What the file is, for messages.

    Returns:
        The mapping (``{}`` for an empty file).

    Raises:
        RecipeError: Naming the file: unreadable, not UTF-8, not YAML, a duplicate key, not a mapping.
    """
    path = Path(path)
    data = parse_yaml(_read_text(path, what), str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a {what} must hold a mapping of keys, got {type(data).__name__}")
    return data
