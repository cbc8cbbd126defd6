"""The lm-evaluation-harness model ``dsq`` (dsq.eval.lm_eval_adapter) on a tiny Llama and its ONNX export.

A local multiple-choice task (tests/eval/lm_eval_task/, JSONL data, ``dataset_path: json``) runs
through ``lm_eval.simple_evaluate``; scores are checked against the torch model's own logits.
Nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed (pip install lm-eval) - the lm-eval adapter is not tested"
)

import torch  # noqa: E402
import yaml  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dsq.eval import MCItem, multiple_choice  # noqa: E402
from dsq.eval.lm_eval_adapter import DsqLM  # noqa: E402
from dsq.quantize.model_dir import load_for_export  # noqa: E402

TASK = "dsq_tiny_mc"
TASK_DIR = Path(__file__).parent / "lm_eval_task"
QUESTION = "Question: What color is the sky on a clear day?\nAnswer:"


@pytest.fixture(scope="module", autouse=True)
def _offline() -> object:
    """No hub: every hub and datasets look-up is refused (datasets reads its flag at import)."""
    import datasets.config

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def onnx_dir(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dsq.export import export_onnx
    from dsq.tools.testing import fast_export_config

    loaded = load_for_export(checkpoint)
    out = tmp_path_factory.mktemp("lm_eval_onnx") / "onnx"
    export_onnx(loaded.model, loaded.tokenizer, out, fast_export_config())
    return out


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory: pytest.TempPathFactory) -> TaskManager:
    """The checked-in task with its data file made absolute and a private datasets cache."""
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    config = yaml.safe_load((TASK_DIR / f"{TASK}.yaml").read_text())
    config["dataset_kwargs"] = {
        "data_files": {"test": str(TASK_DIR / f"{TASK}.jsonl")},
        "cache_dir": str(root / "datasets_cache"),
    }
    (root / "tasks").mkdir()
    (root / "tasks" / f"{TASK}.yaml").write_text(yaml.safe_dump(config))
    # include_defaults=False: only this task is indexed, not lm-eval's thousands of built-in ones
    return TaskManager(include_path=str(root / "tasks"), include_defaults=False)


@pytest.fixture(scope="module")
def torch_lm(checkpoint: Path) -> DsqLM:
    return DsqLM(artifact=str(checkpoint), batch_size=4)


@pytest.fixture(scope="module")
def onnx_lm(onnx_dir: Path) -> DsqLM:
    return DsqLM(artifact=str(onnx_dir), batch_size=4, threads=1)


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _direct(model, tokenizer, context: str, continuation: str, max_length: int | None = None) -> tuple[float, bool]:
    """Sum of the continuation's log-probs from one unpadded forward of the torch model."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx) :]
    full = [tokenizer.bos_token_id] + whole
    if max_length is not None:
        full = full[-(max_length + 1) :]
    inputs = torch.tensor([full[:-1]])
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=inputs).logits[0].float(), dim=-1)  # (seq, vocab)
    picked = logprobs[-len(cont) :]
    targets = torch.tensor(cont)
    score = picked.gather(-1, targets[:, None]).sum().item()
    return score, bool((picked.argmax(-1) == targets).all())


def test_registered_under_dsq() -> None:
    from lm_eval.api.registry import get_model

    assert get_model("dsq") is DsqLM
    assert get_model("hf").__name__ == "HFLM"  # lm-eval's own models are still found


def test_max_length_defaults(torch_lm: DsqLM, onnx_lm: DsqLM, onnx_dir: Path) -> None:
    assert torch_lm.backend == "torch" and onnx_lm.backend == "onnx"
    assert torch_lm.max_length == torch_lm.model.config.max_position_embeddings
    assert onnx_lm.max_length == json.loads((onnx_dir / "genai_config.json").read_text())["model"]["context_length"]


def test_loglikelihood_equals_direct_computation(torch_lm: DsqLM, onnx_lm: DsqLM) -> None:
    pairs = [
        (QUESTION, " blue"),
        (QUESTION, " green"),
        ("Question: How many legs does a cat have?\nAnswer:", " four"),
        ("The quick brown fox jumps over the ", "lazy dog"),  # trailing space moves to the continuation
        ("", "hello world"),  # empty context: conditioned on BOS
    ]
    got = torch_lm.loglikelihood(_requests("loglikelihood", pairs))  # batch of 4 + 1: right padding exercised
    model, tok = torch_lm.model, torch_lm.tokenizer
    for (context, continuation), (score, greedy) in zip(pairs, got):
        direct, direct_greedy = _direct(model, tok, context.rstrip(" "), context[len(context.rstrip(" ")):] + continuation)
        assert score == pytest.approx(direct, abs=1e-4)
        assert greedy == direct_greedy
    # the ONNX export scores the same requests alike
    for (a, _), (b, _) in zip(got, onnx_lm.loglikelihood(_requests("loglikelihood", pairs))):
        assert a == pytest.approx(b, abs=1e-3)
    # a deterministic run-to-run result
    assert torch_lm.loglikelihood(_requests("loglikelihood", pairs)) == got


def test_loglikelihood_truncates_from_the_left(checkpoint: Path, torch_lm: DsqLM) -> None:
    short = DsqLM(artifact=str(checkpoint), max_length=6)
    (score, greedy), = short.loglikelihood(_requests("loglikelihood", [(QUESTION, " blue")]))
    direct, direct_greedy = _direct(torch_lm.model, torch_lm.tokenizer, QUESTION, " blue", max_length=6)
    assert score == pytest.approx(direct, abs=1e-4)
    assert greedy == direct_greedy


def test_loglikelihood_rolling(torch_lm: DsqLM, onnx_lm: DsqLM, checkpoint: Path) -> None:
    text = "The quick brown fox jumps over the lazy dog. It was a sunny day."
    (score,) = torch_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    tok = torch_lm.tokenizer
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logprobs = torch.log_softmax(torch_lm.model(input_ids=torch.tensor([ids[:-1]])).logits[0], dim=-1)
    assert score == pytest.approx(logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item(), abs=1e-4)
    # windows of 8 tokens: every token scored once, with less context than in one pass
    windowed = DsqLM(artifact=str(checkpoint), max_length=8)
    (w_torch,) = windowed.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    full_length, onnx_lm.max_length = onnx_lm.max_length, 8
    try:
        (w_onnx,) = onnx_lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    finally:
        onnx_lm.max_length = full_length
    assert w_torch == pytest.approx(w_onnx, abs=1e-3)
    assert w_torch != pytest.approx(score, abs=1e-3)


def test_generate_until_is_greedy_and_honours_stops(torch_lm: DsqLM, onnx_lm: DsqLM) -> None:
    prompt = "Once upon a time"
    (text,) = torch_lm.generate_until(_requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 12})]))
    # greedy reference without cache: argmax of a full forward per step
    tok, model = torch_lm.tokenizer, torch_lm.model
    ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(12):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    assert text == tok.decode(new, skip_special_tokens=True)
    assert onnx_lm.generate_until(_requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 12})])) == [text]
    # max_gen_toks and until
    (few,) = torch_lm.generate_until(_requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 3})]))
    assert few == tok.decode(new[:3], skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop:
        (cut,) = torch_lm.generate_until(_requests("generate_until", [(prompt, {"until": [stop], "max_gen_toks": 12})]))
        assert cut == text.split(stop)[0]


def _evaluate(artifact: Path, task_manager: TaskManager) -> dict:
    return lm_eval.simple_evaluate(
        model="dsq",
        model_args=f"artifact={artifact},batch_size=4,threads=1",
        tasks=[TASK],
        task_manager=task_manager,
        bootstrap_iters=0,
        log_samples=True,
    )


def _logliks(results: dict) -> list[list[float]]:
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in s["resps"]] for s in samples]


def test_local_task_torch_and_onnx(checkpoint: Path, onnx_dir: Path, task_manager: TaskManager, torch_lm: DsqLM) -> None:
    torch_res = _evaluate(checkpoint, task_manager)
    onnx_res = _evaluate(onnx_dir, task_manager)
    torch_acc = torch_res["results"][TASK]["acc,none"]
    onnx_acc = onnx_res["results"][TASK]["acc,none"]
    assert 0.0 <= torch_acc <= 1.0
    assert "acc_norm,none" in torch_res["results"][TASK]
    assert torch_acc == onnx_acc
    assert onnx_res["results"][TASK]["acc_norm,none"] == torch_res["results"][TASK]["acc_norm,none"]
    for a, b in zip(_logliks(torch_res), _logliks(onnx_res), strict=True):
        assert a == pytest.approx(b, abs=1e-3)
    # dsq's own multiple-choice scorer agrees (lm-eval puts a space before each choice)
    docs = [json.loads(line) for line in (TASK_DIR / f"{TASK}.jsonl").read_text().splitlines() if line.strip()]
    items = [MCItem(f"Question: {d['question']}\nAnswer:", tuple(" " + c for c in d["choices"]), d["gold"]) for d in docs]
    own = multiple_choice(torch_lm.model, torch_lm.tokenizer, items, progress=False)
    assert len(_logliks(torch_res)) == own.n
    assert torch_acc == pytest.approx(own.acc)
