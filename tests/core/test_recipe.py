"""Recipes are strict: unknown keys, wrong types and bad overrides fail naming the key and file."""
from pathlib import Path

import pytest

from dsq.core.errors import RecipeError
from dsq.run.recipe import dump_recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_bundled_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.output


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_unknown_nested_key_names_path_file_and_allowed(tmp_path):
    p = write(tmp_path, "quantize:\n  weights:\n    bitz: 4\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(p)
    msg = str(exc.value)
    assert "quantize.weights.bitz" in msg and str(p) in msg
    assert "bits, granularity, group_size, symmetric" in msg


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, "modle: x\n")
    with pytest.raises(RecipeError, match=r"unknown key 'modle'.*allowed keys here: .*model"):
        load_recipe(p)


def test_wrong_type_names_key(tmp_path):
    p = write(tmp_path, "quantize:\n  weights:\n    group_size: lots\n")
    with pytest.raises(RecipeError, match=r"quantize\.weights\.group_size"):
        load_recipe(p)


def test_bits_must_be_4_or_8(tmp_path):
    with pytest.raises(RecipeError, match=r"quantize\.weights\.bits.*4 or 8"):
        load_recipe(write(tmp_path, "quantize: {weights: {bits: 3}}\n"))


def test_not_a_mapping_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "a: [1,\n"))
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_overrides_are_typed_and_validated(tmp_path):
    p = write(tmp_path, "output: a\n")
    r = load_recipe(p, ["quantize.weights.bits=4", "output=b", "model=/x", "eval.gates.max_ppl=12.5"])
    assert r.quantize.weights.bits == 4 and r.output == "b" and r.model == "/x"
    assert r.eval.gates.max_ppl == 12.5
    with pytest.raises(RecipeError, match=r"unknown key 'quantize\.wieghts'.*command-line"):
        load_recipe(p, ["quantize.wieghts.bits=4"])
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(p, ["bits4"])
    with pytest.raises(RecipeError, match="is not a section"):
        load_recipe(p, ["output.x=1"])


def test_stride_cannot_exceed_context(tmp_path):
    with pytest.raises(RecipeError, match="stride"):
        load_recipe(write(tmp_path, "eval: {perplexity: {context: 64, stride: 128}}\n"))


def test_resolved_recipe_roundtrips(tmp_path):
    r = load_recipe(None, ["quantize.weights.bits=4"])
    p = write(tmp_path, dump_recipe(r))
    assert load_recipe(p) == r


def test_a_section_of_another_method_names_the_key_and_what_the_method_reads():
    with pytest.raises(RecipeError, match=r"unknown key 'quantize\.gptq'.*allowed keys here: awq, calibration, device"):
        load_recipe(None, ["quantize.method=awq", "quantize.gptq.damp=0.1"])
    with pytest.raises(RecipeError, match=r"unknown key 'quantize\.weights'.*allowed keys here: calibration, device"):
        load_recipe(None, ["quantize.method=w8a8", "quantize.weights.bits=4"])


def test_an_unknown_method_lists_the_registered_ones():
    with pytest.raises(RecipeError, match=r"invalid value for 'quantize\.method'.*'rtn', 'gptq', 'awq'.*got 'foo'"):
        load_recipe(None, ["quantize.method=foo"])


def test_errors_inside_a_method_section_name_the_key_without_the_union_tag():
    with pytest.raises(RecipeError, match=r"invalid value for 'quantize\.gptq\.damp'"):
        load_recipe(None, ["quantize.method=gptq", "quantize.gptq.damp=2"])


def test_every_registered_method_section_builds_its_config():
    from dsq.quantize import METHODS, method_of

    for name, method in METHODS.items():
        recipe = load_recipe(None, [f"quantize.method={name}"])
        config = recipe.quantize.config()
        assert isinstance(config, method.config) and method_of(config) is method
