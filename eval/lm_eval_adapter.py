"""lm-evaluation-harness model ``dsq``: evaluate dsq artifacts (torch or ONNX) with lm-eval tasks.

Importing this module registers the model name ``dsq`` in lm-eval's model registry. lm-eval
(0.4.13) has no plugin mechanism for outside models, so something must import this module
before lm-eval looks the name up; nothing in ``dsq`` imports it, so ``import dsq.eval`` never
needs lm-eval. Two ways in:

Python::

    import lm_eval
    import dsq.eval.lm_eval_adapter  # noqa: F401  (registers "dsq")

    results = lm_eval.simple_evaluate(model="dsq", model_args="artifact=runs/int4", tasks=["arc_easy"])

Command line (the ``lm_eval`` command with ``dsq`` registered; same arguments as ``lm_eval``)::

    python -m dsq.eval.lm_eval_adapter --model dsq --model_args artifact=runs/int4/onnx \\
        --tasks my_task --include_path path/to/tasks

``model_args``:
    artifact: a directory. One holding ``model.onnx`` is an ONNX export run by
        :class:`dsq.export.OrtCausalLM`; any other is loaded by
        :func:`dsq.quantize.model_dir.load_for_export` (fp checkpoint or dsq compressed-tensors artifact).
    batch_size: requests per forward pass of the log-likelihood requests (default 8; the
        ``lm_eval`` command passes its own ``--batch_size``, 1 unless given, when ``model_args``
        does not name one). Generation runs one request at a time.
    max_length: most tokens the model sees at once (default: the config's
        ``max_position_embeddings``; for an ONNX export ``genai_config.json``'s
        ``model.context_length``; else 2048). Longer inputs are cut from the left.
    add_bos_token: put the tokenizer's BOS token before every context (default true, as
        :func:`dsq.eval.multiple_choice.multiple_choice` does). An empty context is always
        conditioned on BOS (EOS when there is no BOS).
    threads: torch / ONNX Runtime intra-op threads (default: their own choice).
    device: torch device of a torch artifact (default: where it was loaded, the CPU); an
        ONNX export runs on ONNX Runtime's CPU provider.

Scoring is exact and deterministic: each request is scored on its own row (right-padded batches,
so no row shifts another's positions), the log-softmax of the logits at the continuation's
positions gives the summed continuation log-probability, and ``is_greedy`` says whether the
argmax at each of those positions is the continuation token. Generation is greedy.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import lm_eval.models  # noqa: F401  (lm-eval loads its own models only while its registry is empty)
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dsq.eval.multiple_choice import encode_pair

logger = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256

__all__ = ["DsqLM", "is_onnx_export", "main"]


def is_onnx_export(path: str | Path) -> bool:
    """Whether ``path`` is an ONNX export directory (it holds ``model.onnx``)."""
    return (Path(path) / ONNX_FILE).is_file()


def _onnx_context_length(path: Path) -> int | None:
    """``model.context_length`` of the export's ``genai_config.json``, if there is one."""
    config = path / GENAI_CONFIG
    if not config.is_file():
        return None
    try:
        value = json.loads(config.read_text()).get("model", {}).get("context_length")
    except (json.JSONDecodeError, AttributeError):
        return None
    return int(value) if value else None


def _parse_batch_size(value: Any) -> int:
    """An int from ``batch_size`` (``None``: the default; ``auto`` is not supported and gives the default)."""
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and value.strip().lower().startswith("auto"):
        logger.warning("dsq: batch_size=%s is not supported; using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    size = int(value)
    if size <= 0:
        raise ValueError(f"batch_size must be positive, got {value!r}")
    return size


def _usable_device(device: str | None) -> torch.device | None:
    """``device`` as a torch device, or ``None`` (stay on the CPU) when it is absent or not available here.

    The ``lm_eval`` command passes ``cuda:0`` unless told otherwise; on a machine without CUDA the
    model stays where it was loaded.
    """
    if device is None:
        return None
    target = torch.device(device)
    if target.type == "cuda" and not torch.cuda.is_available():
        logger.warning("dsq: device=%s requested but CUDA is not available; running on the CPU", device)
        return None
    if target.type == "mps" and not torch.backends.mps.is_available():
        logger.warning("dsq: device=%s requested but MPS is not available; running on the CPU", device)
        return None
    return target


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    return bool(value)


@register_model("dsq")
class DsqLM(LM):
    """A dsq artifact (torch model or ONNX export) as an lm-evaluation-harness ``LM``.

    Args:
        artifact: ONNX export directory (holds ``model.onnx``) or a directory that
            :func:`dsq.quantize.model_dir.load_for_export` loads.
        batch_size: log-likelihood requests per forward pass.
        max_length: context window; longer inputs are truncated from the left.
        add_bos_token: prepend BOS to every context.
        threads: intra-op threads of torch / ONNX Runtime.
        device: torch device for a torch artifact.
        max_batch_size: accepted (lm-eval passes it) and ignored.
    """

    def __init__(
        self,
        artifact: str | Path,
        batch_size: int | str | None = None,
        max_length: int | None = None,
        add_bos_token: bool | str = True,
        threads: int | None = None,
        device: str | None = None,
        max_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        path = Path(str(artifact)).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"dsq: artifact {path} is not a directory")
        self.artifact = path
        self.batch_size = _parse_batch_size(batch_size)
        self.add_bos_token = _as_bool(add_bos_token)
        self.backend = "onnx" if is_onnx_export(path) else "torch"
        threads = int(threads) if threads else None
        if self.backend == "onnx":
            from dsq.export import OrtCausalLM

            if device not in (None, "cpu"):
                logger.info("dsq: an ONNX export runs on ONNX Runtime's CPU provider; device=%s ignored", device)
            self.model = OrtCausalLM(path, threads=threads)
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            default_length = _onnx_context_length(path)
            self._device = torch.device("cpu")
        else:
            from dsq.quantize.model_dir import load_for_export

            if threads:
                torch.set_num_threads(threads)
            loaded = load_for_export(path)
            self.model = loaded.model.eval()
            self.tokenizer = loaded.tokenizer
            target = _usable_device(device)
            if target is not None:
                self.model.to(target)
            default_length = getattr(self.model.config, "max_position_embeddings", None)
            self._device = next(self.model.parameters(), torch.empty(0)).device
        self.max_length = int(max_length) if max_length else int(default_length or DEFAULT_MAX_LENGTH)
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2, got {self.max_length}")
        bos = self.tokenizer.bos_token_id
        eos = self.tokenizer.eos_token_id
        self.eot_token_id: int | None = None if eos is None else int(eos)
        prefix = bos if bos is not None else eos
        if prefix is None:
            raise ValueError(f"dsq: the tokenizer of {path} has neither a BOS nor an EOS token")
        self.prefix_token_id = int(prefix)
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else (eos if eos is not None else 0))
        self._warned_sampling = False

    # ------------------------------------------------------------------ lm-eval plumbing
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "DsqLM":
        """``model_args`` string; its values win over lm-eval's ``batch_size`` / ``device`` defaults."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> "DsqLM":
        """``model_args`` dict; its values win over lm-eval's ``batch_size`` / ``device`` defaults."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **dict(arg_dict)})

    def get_model_info(self) -> dict[str, Any]:
        return {"dsq_artifact": str(self.artifact), "dsq_backend": self.backend, "dsq_max_length": self.max_length}

    @property
    def tokenizer_name(self) -> str:
        return str(self.artifact).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ------------------------------------------------------------------ tokens
    def tok_encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _prefix(self) -> list[int]:
        """Tokens put before every context: BOS when ``add_bos_token`` (EOS when there is no BOS)."""
        return [self.prefix_token_id] if self.add_bos_token else []

    def encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens of a log-likelihood request, split the way lm-eval splits them.

        Trailing whitespace of the context moves to the continuation, ``context + continuation`` is
        encoded once and the continuation is what follows ``len(encode(context))`` tokens. An empty
        context becomes the prefix token (BOS, else EOS).
        """
        context_ids, continuation_ids = encode_pair(self.tokenizer, context, continuation)
        context_ids = self._prefix() + context_ids
        if not context_ids:
            context_ids = [self.prefix_token_id]
        return context_ids, continuation_ids

    # ------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def _logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[batch, seq, vocab]`` on the CPU."""
        if self.backend == "torch":
            input_ids, attention_mask = input_ids.to(self._device), attention_mask.to(self._device)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits.float().cpu()

    def score_tokens(
        self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], *, disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """``(sum of continuation log-probs, is_greedy)`` for each ``(context_ids, continuation_ids)``.

        The model reads ``(context + continuation)[:-1]``, cut from the left to ``max_length``
        tokens; the continuation is scored in full (an empty one scores ``(0.0, True)``).

        Raises:
            ValueError: an empty context, or a continuation longer than ``max_length``.
        """
        prepared: list[tuple[list[int], list[int]] | None] = []
        for context_ids, continuation_ids in requests:
            context_ids, continuation_ids = list(context_ids), list(continuation_ids)
            if not continuation_ids:
                prepared.append(None)
                continue
            if not context_ids:
                raise ValueError("dsq: a log-likelihood request needs at least one context token")
            if len(continuation_ids) > self.max_length:
                raise ValueError(
                    f"dsq: continuation of {len(continuation_ids)} tokens exceeds max_length={self.max_length}"
                )
            inputs = (context_ids + continuation_ids)[-(self.max_length + 1) :][:-1]
            prepared.append((inputs, continuation_ids))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(prepared)
        todo = [i for i, p in enumerate(prepared) if p is not None]
        # Longest first (ties by position): batches of similar length, the same batches every run.
        todo.sort(key=lambda i: (-len(prepared[i][0]), i))
        with tqdm(total=len(todo), desc="dsq log-likelihood", disable=disable_tqdm) as bar:
            for start in range(0, len(todo), self.batch_size):
                rows = todo[start : start + self.batch_size]
                width = max(len(prepared[i][0]) for i in rows)
                input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (batch, seq)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (batch, seq)
                for row, i in enumerate(rows):
                    inputs = prepared[i][0]
                    input_ids[row, : len(inputs)] = torch.tensor(inputs, dtype=torch.long)
                    attention_mask[row, : len(inputs)] = 1
                logits = self._logits(input_ids, attention_mask)  # (batch, seq, vocab)
                for row, i in enumerate(rows):
                    inputs, continuation = prepared[i]
                    end, n = len(inputs), len(continuation)
                    logprobs = torch.log_softmax(logits[row, end - n : end], dim=-1)  # (n, vocab)
                    targets = torch.tensor(continuation, dtype=torch.long)  # (n,)
                    picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)  # (n,)
                    greedy = bool((logprobs.argmax(-1) == targets).all())
                    results[i] = (float(picked.double().sum()), greedy)
                bar.update(len(rows))
        return results

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.encode_request(*req.args) for req in requests]
        results = self.score_tokens(pairs, disable_tqdm=disable_tqdm)
        for req, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", req.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts over disjoint ``max_length`` windows, each with the most context."""
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for index, req in enumerate(requests):
            (text,) = req.args
            for window in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            ):
                windows.append(lm_utils.make_disjoint_window(window))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self.score_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += score
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ generation
    @torch.inference_mode()
    def _greedy(self, prompt: list[int], max_new_tokens: int, until: list[str]) -> list[int]:
        """Greedy tokens after ``prompt`` (KV-cached); stops at EOS, a stop string, or ``max_new_tokens``."""
        ids = torch.tensor([prompt], dtype=torch.long)
        generated: list[int] = []
        if max_new_tokens <= 0:
            return generated
        if self.backend == "onnx":
            logits = self.model.prefill(ids)[0]
        else:
            out = self.model(input_ids=ids.to(self._device), use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        while True:
            token = int(logits.float().argmax(-1))
            if self.eot_token_id is not None and token == self.eot_token_id:
                break
            generated.append(token)
            if len(generated) >= max_new_tokens:
                break
            if until and any(stop in self.tok_decode(generated) for stop in until):
                break
            nxt = torch.tensor([token], dtype=torch.long)
            if self.backend == "onnx":
                logits = self.model.decode(nxt)[0]
            else:
                out = self.model(input_ids=nxt[None].to(self._device), past_key_values=past, use_cache=True)
                past, logits = out.past_key_values, out.logits[0, -1]
        return generated

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context, cut at the first ``until`` string, at most ``max_gen_toks`` tokens."""
        outputs: list[str] = []
        for req in tqdm(requests, desc="dsq generate", disable=disable_tqdm):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None)
            if until is None:
                until = []
            elif isinstance(until, str):
                until = [until]
            until = [s for s in until if s]
            max_gen_toks = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            sampling = _as_bool(kwargs.pop("do_sample", False)) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0
            if sampling and not self._warned_sampling:
                logger.warning("dsq: generation is greedy; sampling arguments are ignored")
                self._warned_sampling = True
            max_gen_toks = min(max_gen_toks, self.max_length - 1)
            prompt = self._prefix() + self.tok_encode(context)
            prompt = prompt[-(self.max_length - max_gen_toks) :] if prompt else [self.prefix_token_id]
            text = self.tok_decode(self._greedy(prompt, max_gen_toks, until))
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", req.args, text)
            outputs.append(text)
        return outputs


def main(argv: Sequence[str] | None = None) -> None:
    """The ``lm_eval`` command line with the ``dsq`` model registered: ``python -m dsq.eval.lm_eval_adapter ...``."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
