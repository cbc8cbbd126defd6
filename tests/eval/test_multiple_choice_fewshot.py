"""Few-shot multiple choice: exemplar draw, determinism, zero-shot parity, window truncation, wiring."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsq.core.checkpoint import bundled_model_path
from dsq.core.loading import load_checkpoint
from dsq.core.errors import DataError, RecipeError
from dsq.eval import BenchmarkSuite, Evaluator, PerplexityConfig
from dsq.eval.data import MCItem
from dsq.eval.multiple_choice import FewShot, _requests, encode_pair, fewshot_prompts, multiple_choice
from dsq.run.steps import benchmark_suite
from dsq.run.recipe import Recipe
from dsq.tools.testing import byte_bpe_tokenizer, tiny_llama
from dsq.run.validate import load_gates_file

ANIMALS = ["cat", "dog", "cow", "pig", "hen", "fox", "owl", "bee", "ant", "elk", "yak", "emu"]


def _items(n: int = 12) -> list[MCItem]:
    """Items with distinct contexts; the gold choice is the animal named in the context."""
    return [MCItem(context=f"Q{i}: the {ANIMALS[i]} says", choices=(f" {ANIMALS[i]}!", f" not-{ANIMALS[i]}"), gold=0)
            for i in range(n)]


def _solved(item: MCItem) -> str:
    return item.context + item.choices[item.gold]


def _write_jsonl(path: Path, items: list[MCItem]) -> Path:
    path.write_text("".join(json.dumps({"context": i.context, "choices": list(i.choices), "gold": i.gold}) + "\n"
                            for i in items))
    return path


def _tokenizer():
    return byte_bpe_tokenizer(["Q1: the cat says cat! the dog says dog! not-cow " * 20], 300)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_prompt_holds_k_other_solved_items_and_never_the_item(k: int) -> None:
    items = _items()
    solved = {_solved(item) for item in items}
    delimiter = "\n\n"
    prompts = fewshot_prompts(items, FewShot(num_fewshot=k, delimiter=delimiter))
    assert len(prompts) == len(items)
    for item, prompt in zip(items, prompts):
        assert prompt.choices == item.choices and prompt.gold == item.gold
        assert prompt.context.endswith(delimiter + item.context)
        exemplars = prompt.context[: -len(item.context)].split(delimiter)[:-1]
        assert len(exemplars) == k and len(set(exemplars)) == k  # k distinct exemplars
        assert all(e in solved for e in exemplars)  # each is an item's context + its gold choice
        assert _solved(item) not in exemplars and prompt.context.count(item.context) == 1


def test_draw_is_deterministic_and_seeded() -> None:
    items = _items()
    first = fewshot_prompts(items, FewShot(num_fewshot=3))
    assert fewshot_prompts(items, FewShot(num_fewshot=3)) == first  # same in another call (and process: str seeds)
    assert fewshot_prompts(items[:5], FewShot(num_fewshot=3, pool=tuple(items))) == first[:5]  # independent of limit
    other = fewshot_prompts(items, FewShot(num_fewshot=3, seed=7))
    assert other != first
    # pinned: a change of the draw would change every reported few-shot figure
    assert first[0].context == "Q6: the owl says owl!\n\nQ4: the hen says hen!\n\nQ7: the bee says bee!\n\nQ0: the cat says"
    custom = fewshot_prompts(items, FewShot(num_fewshot=1, delimiter=" | "))
    assert custom[0].context.endswith(" | Q0: the cat says") and custom[0].context.count(" | ") == 1


def test_separate_fewshot_set_skips_copies_of_the_item() -> None:
    items = _items(4)
    pool = tuple(_items(12)[4:] + items[:1])  # the pool holds a copy of item 0
    prompts = fewshot_prompts(items, FewShot(num_fewshot=8, pool=pool))
    assert _solved(items[0]) not in prompts[0].context  # its only 8 usable exemplars are the other ones
    assert _solved(items[0]) in prompts[1].context  # the copy is a valid exemplar for another item
    with pytest.raises(DataError, match=r"extra\.jsonl has 9 item\(s\), 8 of them usable"):
        fewshot_prompts(items, FewShot(num_fewshot=9, pool=pool, source="extra.jsonl"))


def test_zero_shot_is_the_old_scoring() -> None:
    tokenizer = _tokenizer()
    model = tiny_llama(len(tokenizer))
    items = _items(6)
    assert fewshot_prompts(items, FewShot()) == items
    old = multiple_choice(model, tokenizer, items, progress=False)
    new = multiple_choice(model, tokenizer, items, progress=False, fewshot=FewShot(0), max_length=512)
    assert new == old and new.num_fewshot == 0 and new.truncated == 0
    # the window changes nothing when every input fits: identical requests, so identical scores
    assert _requests(tokenizer, items, True, 512) == _requests(tokenizer, items, True, None)
    two = multiple_choice(model, tokenizer, items, progress=False, fewshot=FewShot(2))
    assert two.num_fewshot == 2 and two.n == 6 and 0 <= two.acc <= 1


def test_long_prompts_lose_context_from_the_left_never_the_choice() -> None:
    tokenizer = _tokenizer()
    items = fewshot_prompts(_items(), FewShot(num_fewshot=6))
    window = 24
    requests = _requests(tokenizer, items, True, window)
    for request, (item, choice) in zip(requests, [(i, c) for i in items for c in i.choices]):
        context_ids, choice_ids = encode_pair(tokenizer, item.context, choice)
        assert len(request.input_ids) == window and request.truncated
        assert list(request.input_ids) + [choice_ids[-1]] == (context_ids + choice_ids)[-(window + 1):]  # the tail
        assert list(request.continuation) == choice_ids  # the whole choice is scored
    model = tiny_llama(len(tokenizer))
    result = multiple_choice(model, tokenizer, items, progress=False, max_length=window)
    assert result.truncated == len(requests)
    with pytest.raises(DataError, match="do not fit the model's window of 2 tokens"):
        _requests(tokenizer, items, True, 2)


def test_too_few_items_fail_naming_the_file(tmp_path: Path) -> None:
    mc = _write_jsonl(tmp_path / "three.jsonl", _items(3))
    suite = BenchmarkSuite(text_path=None, mc_path=mc, perplexity=PerplexityConfig(), mc_num_fewshot=3)
    with pytest.raises(DataError, match=r"num_fewshot=3: .*three\.jsonl has 3 item\(s\), 2 of them usable"):
        Evaluator(suite, _tokenizer(), progress=False)
    # a limit does not shrink the exemplar set: the whole file is drawn from
    limited = BenchmarkSuite(text_path=None, mc_path=mc, perplexity=PerplexityConfig(), mc_limit=1, mc_num_fewshot=2)
    assert Evaluator(limited, _tokenizer(), progress=False).mc_fewshot.pool is not None
    # a separate exemplar file lifts the bound
    extra = _write_jsonl(tmp_path / "extra.jsonl", _items(12)[3:])
    suite = BenchmarkSuite(text_path=None, mc_path=mc, perplexity=PerplexityConfig(), mc_num_fewshot=3, mc_fewshot_data=extra)
    assert Evaluator(suite, _tokenizer(), progress=False).mc_fewshot.source == str(extra)


def test_recipe_keys_reach_the_suite_in_runs_and_in_validate(tmp_path: Path) -> None:
    extra = _write_jsonl(tmp_path / "extra.jsonl", _items())
    mc = {"num_fewshot": 2, "fewshot_seed": 5, "fewshot_data": str(extra), "fewshot_delimiter": "\n###\n", "limit": 4}
    suite = benchmark_suite(Recipe.model_validate({"eval": {"multiple_choice": mc}}).eval)
    assert (suite.mc_num_fewshot, suite.mc_fewshot_seed, suite.mc_fewshot_data, suite.mc_fewshot_delimiter, suite.mc_limit) == (
        2, 5, extra, "\n###\n", 4)
    default = benchmark_suite(Recipe().eval)
    assert (default.mc_num_fewshot, default.mc_fewshot_seed, default.mc_fewshot_delimiter) == (0, 1234, "\n\n")
    gates = tmp_path / "gates.yaml"
    gates.write_text("multiple_choice: {num_fewshot: 2, limit: 4}\n")
    section = load_gates_file(gates, tmp_path)  # dsq validate's gates file
    assert benchmark_suite(section).mc_num_fewshot == 2
    gates.write_text("multiple_choice: {num_fewshot: -1}\n")
    with pytest.raises(RecipeError, match="num_fewshot"):
        load_gates_file(gates, tmp_path)


def test_bundled_model_two_shot(tmp_path: Path) -> None:
    """2-shot on the bundled model: a valid accuracy, recorded as 2-shot, prompts within the window."""
    loaded = load_checkpoint(bundled_model_path())
    suite = benchmark_suite(Recipe.model_validate(
        {"eval": {"perplexity": None, "multiple_choice": {"num_fewshot": 2, "limit": 12}}}).eval)
    row = Evaluator(suite, loaded.tokenizer, progress=False).evaluate("original", loaded.model)
    assert row.mc.n == 12 and row.mc.num_fewshot == 2
    assert 0.0 <= row.mc.acc <= 1.0 and 0.0 <= row.mc.acc_norm <= 1.0
    assert row.mc.acc > 0  # a trained model gets some right
    assert row.to_dict()["mc"]["num_fewshot"] == 2
