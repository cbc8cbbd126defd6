"""Command line: ``dsq run RECIPE [key.path=value ...]``, ``dsq export ARTIFACT``, ``dsq recipe``, ``dsq plan CHECKPOINT [RECIPE]``.

Exit codes are a contract: 0 success; 1 a quality gate failed (the artifact is written and names
the failing metric), and nothing else; 2 anything else that stops a command: unusable input (recipe,
checkpoint, data), a usage error, an I/O error or an unexpected exception, always as one line on
stderr (the traceback with ``--debug`` or ``DSQ_DEBUG=1``) and with no artifact written; 130 / 143
after SIGINT / SIGTERM, once temporary files are removed.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback

from dsq import __version__
from dsq.core.errors import DsqError, DsqInputError, Interrupted

EXIT_OK, EXIT_GATE_FAILED, EXIT_INPUT = 0, 1, 2
EXIT_SIGNAL_BASE = 128  # exit 128 + N after signal N: 130 for SIGINT, 143 for SIGTERM (shell convention)
MAX_MESSAGE_CHARS = 4000  # an error message longer than this is cut (a message must stay readable)

RUN_EPILOG = """\
overrides are dotted paths into the recipe, parsed as YAML values, e.g.
  dsq run recipes/demo.yaml quantize.weights.bits=4 quantize.weights.group_size=32 output=runs/int4
  dsq run recipes/demo.yaml model=/path/to/hf-dir output=runs/x overwrite=true
exit codes: 0 ok, 1 a gate failed, 2 bad input (nothing written)
"""


EXPORT_EPILOG = """\
examples:
  dsq export runs/int4                      # -> runs/int4-onnx/model.onnx (+ .data, manifest, genai_config)
  dsq export runs/int4 -o deploy/int4 --accuracy-level 4 --evaluate --speed
exit codes: 0 ok, 2 bad input or an export that does not match PyTorch (nothing written)
"""


VALIDATE_EPILOG = """\
examples:
  dsq validate runs/int4 --baseline /models/DeepSeek-V3 --gates ci/gates.yaml -o ci-out
  dsq validate runs/int4/onnx --gates ci/gates.yaml
exit codes: 0 every gate passed, 1 a gate failed (named), 2 unusable input: a file missing or changed
since the manifest was written (named), bad gates file, unloadable model
"""


PLAN_EPILOG = """\
examples:
  dsq plan /models/DeepSeek-V3                                  # the default recipe (rtn int8 g128, float32)
  dsq plan /models/DeepSeek-V3 recipes/gptq_int4_g128.yaml dtype=bfloat16 --tflops 200
  dsq plan dsq/assets/public_configs/deepseek-v3 --json         # a directory with only config.json
no tensor data is read: parameters and bytes are exact, peak memory and calibration time are estimates
(time at --tflops, default 50 for a GPU and 1 for a CPU)
exit codes: 0 ok, 2 bad input (missing directory or config.json, unreadable weights, invalid recipe)
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors exit 2, as input errors do
        self.print_usage(sys.stderr)
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsq", description="Compression toolkit for DeepSeek language models.")
    parser.add_argument("--version", action="version", version=f"dsq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an unexpected error (also DSQ_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_run(sub)
    _add_search(sub)
    _add_export(sub)
    _add_validate(sub)
    _add_plan(sub)
    show = sub.add_parser("recipe", help="print a recipe fully resolved (defaults filled in, overrides applied)",
                          description="Validate a recipe and print it resolved.")
    show.add_argument("recipe", nargs="?", help="recipe YAML file (default: all defaults)")
    show.add_argument("overrides", nargs="*", metavar="key.path=value")
    return parser


def _add_run(sub) -> None:
    run = sub.add_parser(
        "run", help="run a recipe: quantize, save the artifact, evaluate against the original",
        description="Run one recipe end to end.", epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_search(sub) -> None:
    search = sub.add_parser(
        "search", help="the smallest artifact that passes the recipe's gates, with per-module schemes",
        description="Measure each module's sensitivity to the recipe's search.candidates, allocate schemes per module, "
                    "and verify allocations end to end against eval.gates until the smallest passing one is found. "
                    "Exit 0: a verified artifact passes every gate; 1: no verified allocation passed; 2: bad input.",
    )
    search.add_argument("recipe", help="recipe YAML file with a search: section")
    search.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    search.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export", help="export an fp checkpoint or a dsq artifact to ONNX (KV cache), validated against PyTorch",
        description="Export a model directory to an ONNX decoder with KV cache and check it in ONNX Runtime.",
        epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("artifact", help="fp HF checkpoint directory or dsq artifact (compressed-tensors)")
    export.add_argument("-o", "--output", help="export directory (default: ARTIFACT-onnx beside it)")
    export.add_argument("--cpu-target", choices=("portable", "vnni"), default="portable",
                        help="int8 kernels the graph feeds: portable (u8 x u8, exact on any CPU; default) or vnni "
                             "(u8 x s8: exact and fast with AVX512-VNNI, AVX-VNNI or AMX; saturating elsewhere)")
    export.add_argument("--accuracy-level", type=int, choices=range(5), default=0,
                        help="MatMulNBits compute: 0/1 fp32 (default), 4 int8 activations")
    export.add_argument("--threads", type=_positive_int, default=None, help="ONNX Runtime intra-op threads")
    export.add_argument("--weight-op", choices=("matmul_nbits", "dequantize_linear"), default="matmul_nbits",
                        help="weight-only layers as ORT's MatMulNBits (default) or standard blocked DequantizeLinear + MatMul")
    export.add_argument("--opset", type=int, choices=(21, 23), default=23,
                        help="ONNX opset: 23 (default) writes one Attention, RMSNormalization and RotaryEmbedding node each "
                             "(ONNX Runtime >= 1.23); 21 the same from elementary ops, for older runtimes")
    export.add_argument("--quantize-embeddings", action="store_true", help="store the input embedding int8 (per-row scales)")
    export.add_argument("--dense-experts", action="store_true",
                        help="MoE: run every routed expert on every token (dense routing weight) instead of each token's top-k")
    export.add_argument("--no-absorb-mla", dest="absorb_mla", action="store_false",
                        help="MLA: re-expand the cached latent through kv_b_proj at every step instead of attending in the latent space")
    export.add_argument("--no-moe-op", dest="moe_op", action="store_false",
                        help="MoE: keep the sparse subgraph instead of one ONNX Runtime MoE / QMoE node per layer")
    export.add_argument("--int8-prefill", nargs="?", const="dynamic", choices=("dynamic", "dynamic_tensor"), default=None,
                        help="weight-only layers also as int8 (one scale per channel) for prompts, through the u8 x s8 int8 "
                             "GEMM, activations per token (dynamic, the default) or per tensor (dynamic_tensor); single-token "
                             "steps keep MatMulNBits (needs --cpu-target vnni; about 1 byte per weight more)")
    export.add_argument("--tolerance", type=_positive_float, default=None,
                        help="max |delta logit| vs PyTorch (default 1e-4 fp, 1e-3 weight-only, 0.25 W8A8)")
    export.add_argument("--evaluate", action="store_true",
                        help="also run the bundled benchmark suite on the torch model and the ONNX model")
    export.add_argument("--speed", action="store_true", help="with --evaluate: measure prefill/decode tokens/s")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export directory")
    export.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_validate(sub) -> None:
    val = sub.add_parser(
        "validate", help="CI gate: verify an artifact's manifest, re-run the benchmarks, apply gates, write JUnit",
        description="Verify, evaluate and gate a dsq artifact (torch) or ONNX export.", epilog=VALIDATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    val.add_argument("artifact", help="dsq artifact directory or ONNX export directory")
    val.add_argument("--baseline", help="the original model (fp checkpoint, artifact or ONNX export) for relative gates")
    val.add_argument("--gates", help="YAML shaped like a recipe's eval: section (benchmark sets, speed, gates); "
                                     "default: the artifact's recipe.yaml eval section")
    val.add_argument("-o", "--output", help="where report.{json,md}, junit.xml and summary.md go (default: ARTIFACT-validation)")
    val.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _add_plan(sub) -> None:
    plan = sub.add_parser(
        "plan", help="estimate parameters, weight bytes, peak memory and calibration time without loading weights",
        description="Plan a recipe on a checkpoint from its config.json and safetensors headers alone.",
        epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("checkpoint", help="HF checkpoint directory (config.json; safetensors weights optional)")
    plan.add_argument("recipe", nargs="?", help="recipe YAML file (default: all defaults)")
    plan.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--tflops", type=_positive_float, default=None,
                      help="throughput for the calibration time (default: both 50 for a GPU and 1 for a CPU)")
    plan.add_argument("--processes", type=_positive_int, default=1,
                      help="processes sharing calibration (torchrun --nproc_per_node N): per-process memory and time")


def _cmd_run(args: argparse.Namespace) -> int:
    from dsq.run.pipeline import run
    from dsq.run.recipe import load_recipe
    from dsq.eval import QuantizationFacts, format_terminal_table

    overrides = list(args.overrides) + (["progress=false"] if args.quiet else [])
    recipe = load_recipe(args.recipe, overrides)
    result = run(recipe)
    if result is None:  # a non-main process of a multi-process training run: the main one reports
        return EXIT_OK
    if result.report is not None:
        print(format_terminal_table(result.report))
        rows = [(c.name, c.quantization.report) for c in result.report.candidates if isinstance(c.quantization, QuantizationFacts)]
    else:
        print("evaluation not run: the model does not fit in memory here (see report.md)")
        rows = [("artifact", result.quantization.report)] if result.quantization is not None else []
    for note in result.report.meta.get("checkpoint_notes", []) if result.report is not None else []:
        print(f"NOTE checkpoint: {note}")
    for name, quantization in rows:
        for note in quantization.notes:
            print(f"NOTE {name}: {note}")
        for kept in quantization.kept:
            if not kept.name.endswith("lm_head"):
                print(f"KEPT {name}: {kept.name} ({kept.reason})")
    if result.reload is not None:
        r = result.reload
        if r.loaded:
            print(f"transformers reload: max |delta logit| = {r.max_abs_diff:.2e} (tolerance {r.tolerance:g})")
            if r.kv_cache is not None:
                print(f"transformers reload, KV cache: {r.kv_cache.note}")
        else:
            print(f"WARNING transformers could not reload the artifact: {r.reason}")
    print(f"artifact: {result.output}")
    if not result.gates_passed:
        failed = [g for g in result.gates if not g.passed]
        for g in failed:
            print(f"GATE FAILED: {g.message}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return EXIT_OK


def _cmd_search(args: argparse.Namespace) -> int:
    from dsq.run.recipe import load_recipe
    from dsq.run.search import run_search, search_markdown

    overrides = list(args.overrides) + (["progress=false"] if args.quiet else [])
    result = run_search(load_recipe(args.recipe, overrides))
    print(search_markdown(result))
    if result.chosen is None:
        print("GATE FAILED: no verified allocation passed the gates", file=sys.stderr)
        return EXIT_GATE_FAILED
    print(f"artifact: {result.output}")
    return EXIT_OK


def _cmd_recipe(args: argparse.Namespace) -> int:
    from dsq.run.recipe import dump_recipe, load_recipe

    print(dump_recipe(load_recipe(args.recipe, args.overrides)), end="")
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dsq.run.export_command import run_export

    source = Path(args.artifact).expanduser()
    output = Path(args.output).expanduser() if args.output else source.parent / f"{source.name}-onnx"
    outcome = run_export(
        source, output, accuracy_level=args.accuracy_level, cpu_target=args.cpu_target, threads=args.threads, tolerance=args.tolerance,
        evaluate=args.evaluate, speed=args.speed, overwrite=args.overwrite, progress=not args.quiet,
        weight_op=args.weight_op, quantize_embeddings=args.quantize_embeddings, dense_experts=args.dense_experts,
        absorb_mla=args.absorb_mla, moe_op=args.moe_op, opset=args.opset, int8_prefill=args.int8_prefill,
    )
    v = outcome.result.validation
    print(f"ONNX export: {outcome.result.onnx_path} ({outcome.result.onnx_bytes / 2**20:.1f} MiB)")
    greedy = "identical greedy tokens" if v.greedy_equal else (
        "greedy tokens differ only where PyTorch's top two logits tie within the tolerance")
    print(f"validation vs PyTorch: max |delta logit| = {v.max_abs_diff:.2e} (tolerance {v.tolerance:g}), "
          f"{greedy}, {len(v.cases)} cases")
    if outcome.report is not None:
        from dsq.eval import format_terminal_table

        print(format_terminal_table(outcome.report))
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dsq.eval import format_terminal_table

    from dsq.run.validate import validate

    result = validate(
        Path(args.artifact).expanduser(), baseline=Path(args.baseline).expanduser() if args.baseline else None,
        gates_file=Path(args.gates).expanduser() if args.gates else None,
        output=Path(args.output).expanduser() if args.output else None, progress=not args.quiet,
    )
    for check in result.checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.name}: {check.message}")
    print(format_terminal_table(result.report))
    print(f"junit: {result.output / 'junit.xml'}  summary: {result.output / 'summary.md'}")
    if not result.passed:
        for g in result.gates:
            if not g.passed:
                print(f"GATE FAILED: {g.message}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    import json

    from dsq.tools.plan import plan_checkpoint
    from dsq.run.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides) if args.recipe or args.overrides else None
    plan = plan_checkpoint(args.checkpoint, recipe, tflops=args.tflops, processes=args.processes)
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.to_markdown(), end="\n" if args.json else "")
    return EXIT_OK


COMMANDS = {"run": _cmd_run, "search": _cmd_search, "recipe": _cmd_recipe, "export": _cmd_export, "validate": _cmd_validate, "plan": _cmd_plan}


def _raise_interrupted(signum: int, frame) -> None:
    # Further signals while the stack unwinds would cut the clean-up short: ignore them.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Interrupted(signum)


def _install_signal_handlers() -> dict[int, object]:
    """SIGINT and SIGTERM raise :class:`Interrupted` (main thread only); returns the previous handlers."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, _raise_interrupted)
    return previous


def _bounded(message: object) -> str:
    """The message, cut to ``MAX_MESSAGE_CHARS`` (a message built from hostile input can be huge)."""
    text = str(message).rstrip()
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return f"{text[:MAX_MESSAGE_CHARS]} ... ({len(text) - MAX_MESSAGE_CHARS} more characters)"


def _describe_unexpected(exc: BaseException) -> str:
    """One line for an exception dsq did not anticipate; OS errors name the path and the reason."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename is not None else ""
        return f"{where}{exc.strerror}"
    if isinstance(exc, MemoryError):
        return "out of memory"
    return f"{type(exc).__name__}: {exc}"


def main(argv: list[str] | None = None) -> int:
    """Run one dsq command; returns the exit code (see the module docstring)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("DSQ_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.command is None:
        parser.print_help()
        return EXIT_INPUT
    previous = _install_signal_handlers()
    try:
        return COMMANDS[args.command](args)
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(f"dsq: interrupted by {signal.Signals(signum).name}; temporary files removed, nothing written",
              file=sys.stderr)
        return EXIT_SIGNAL_BASE + signum
    except DsqInputError as exc:
        print(f"dsq: error: {_bounded(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except DsqError as exc:
        print(f"dsq: failed: {_bounded(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as exc:  # the contract: a traceback is never the interface, exit 1 is only a failed gate
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (rerun with --debug or DSQ_DEBUG=1 for the traceback)"
        print(f"dsq: {args.command} failed: {_bounded(_describe_unexpected(exc))}{hint}", file=sys.stderr)
        return EXIT_INPUT
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
