"""Mutated valid recipes never crash: `dsq recipe` exits 0 or 2 with one short line, never a traceback.

Starting from every recipe in recipes/, hypothesis drops, inserts, renames and replaces keys (random
scalars, strings, lists, mappings, None, huge numbers, NaN, deep nesting), splices raw lines into
the YAML text and adds command-line overrides. ``load_recipe`` must return a Recipe or raise RecipeError (anything else is a defect in
dsq/run/recipe.py), and the CLI must agree with it.
"""
import contextlib
import io
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsq.cli import main
from dsq.core.errors import RecipeError
from dsq.run.recipe import Recipe, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").glob("*.yaml"))
BASES = [yaml.safe_load(p.read_text()) for p in RECIPES]
MAX_MESSAGE = 3000  # characters, the most dsq prints for one error


def _field_names() -> list[str]:
    """Every key the schema knows, so that insertions often hit a real field with a wrong value."""
    names, todo, seen = set(), [Recipe], set()
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.add(model)
        for name, field in model.model_fields.items():
            names.add(name)
            for arg in getattr(field.annotation, "__args__", (field.annotation,)):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    todo.append(arg)
    return sorted(names)


CHARS = string.printable + "\x00\x1f\x7f\x85\u2028\ufeffé€😀:&*!|>%@`#-?[]{},"  # YAML indicators, controls, non-ASCII
TEXT = st.text(alphabet=CHARS, max_size=30)
KEYS = st.one_of(st.sampled_from(_field_names()), st.text(alphabet=CHARS, max_size=12), st.integers(-3, 3))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 1, 2**32, 2**63, 10**30, -(10**30)]),
    st.floats(),  # NaN, inf and huge included
    TEXT,
    st.sampled_from(["", " ", "\x00", "1e23", ".nan", "null", "cuda:0", "meta", "bnb-nf4", "gptq", "(", ".*", "~"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)


def _paths(tree, prefix=()):
    """Every (container path, key) in the tree."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return
    for key, value in items:
        yield prefix, key
        yield from _paths(value, prefix + (key,))


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _nest(value, depth: int, as_list: bool):
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


@st.composite
def mutated_recipe(draw) -> str:
    tree = yaml.safe_load(yaml.safe_dump(draw(st.sampled_from(BASES))))  # a fresh copy
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(tree))
        action = draw(st.sampled_from(["replace", "drop", "insert", "rename", "nest", "whole"]))
        if action == "whole" or not paths:
            tree = draw(VALUES)
            continue
        where, key = draw(st.sampled_from(paths))
        parent = _at(tree, where)
        if action == "replace":
            parent[key] = draw(VALUES)
        elif action == "drop":
            del parent[key]
        elif action == "insert" and isinstance(parent, dict):
            parent[draw(KEYS)] = draw(VALUES)
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(KEYS)] = parent.pop(key)
        elif action == "nest":
            parent[key] = _nest(parent[key], draw(st.integers(1, 60)), draw(st.booleans()))
    text = yaml.safe_dump(tree, sort_keys=False)
    if draw(st.integers(0, 3)) == 0:  # splice a raw line: duplicate keys, aliases, tabs, broken flow syntax
        lines = text.splitlines()
        line = draw(st.one_of(
            st.sampled_from(["seed: 1", "eval: {gates: {max_ppl: 2, max_ppl: 3}}", "x: &a [*a]", "\tquantize: x",
                             "output: *nope", "y: {", "- 1", "<<: {seed: 3}", "model: !!binary aGk=", "? [a]\n: 1"]),
            TEXT,
        ))
        lines.insert(draw(st.integers(0, len(lines))), line)
        text = "\n".join(lines) + "\n"
    return text


def _flow(value) -> str:
    """A value as one line of YAML, the way a user types it after ``key=``."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


OVERRIDES = st.lists(
    st.builds(
        "{}={}".format,
        st.lists(st.sampled_from(_field_names()), min_size=1, max_size=4).map(".".join),
        st.one_of(TEXT, VALUES.map(_flow)),
    ),
    max_size=2,
)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("recipes")


def _cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(text=mutated_recipe(), overrides=OVERRIDES)
def test_mutated_recipes_load_or_fail_cleanly(workdir, text, overrides):
    path = workdir / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        recipe = load_recipe(path, overrides)
    except RecipeError as exc:
        recipe, message = None, str(exc)
        assert 0 < len(message) <= MAX_MESSAGE, message[:300]
    code, out, err = _cli(["recipe", str(path), *overrides])
    assert "Traceback" not in out + err
    if recipe is None:
        assert code == 2 and out == "" and err == f"dsq: error: {message}\n"
    else:
        assert code == 0 and err == ""
        again = workdir / "resolved.yaml"
        again.write_text(out, encoding="utf-8")
        assert load_recipe(again).model_dump() == recipe.model_dump()  # what dsq prints is what it runs
