"""Command line: ``dsq run RECIPE [key.path=value ...]``.

Exit codes: 0 success; 1 a quality gate failed (the artifact is written and names the
failing metric); 2 unusable input (recipe, checkpoint, data) or usage error, with no artifact.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import __version__
from .errors import DsqError, DsqInputError

EXIT_OK, EXIT_GATE_FAILED, EXIT_INPUT = 0, 1, 2

RUN_EPILOG = """\
overrides are dotted paths into the recipe, parsed as YAML values, e.g.
  dsq run recipes/demo.yaml quantize.weights.bits=4 quantize.weights.group_size=32 output=runs/int4
  dsq run recipes/demo.yaml model=/path/to/hf-dir output=runs/x overwrite=true
exit codes: 0 ok, 1 a gate failed, 2 bad input (nothing written)
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors exit 2, as input errors do
        self.print_usage(sys.stderr)
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dsq", description="Compression toolkit for DeepSeek language models.")
    parser.add_argument("--version", action="version", version=f"dsq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser(
        "run", help="run a recipe: quantize, save the artifact, evaluate against the original",
        description="Run one recipe end to end.", epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("recipe", help="recipe YAML file")
    run.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    show = sub.add_parser("recipe", help="print a recipe fully resolved (defaults filled in, overrides applied)",
                          description="Validate a recipe and print it resolved.")
    show.add_argument("recipe", nargs="?", help="recipe YAML file (default: all defaults)")
    show.add_argument("overrides", nargs="*", metavar="key.path=value")
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import run
    from .recipe import load_recipe
    from dsq.eval import format_terminal_table

    overrides = list(args.overrides) + (["progress=false"] if args.quiet else [])
    recipe = load_recipe(args.recipe, overrides)
    result = run(recipe)
    if result is None:  # a non-main process of a multi-process training run: the main one reports
        return EXIT_OK
    print(format_terminal_table(result.report))
    for candidate in result.report.candidates:
        quantization = candidate.extra.get("quantization") or {}
        for note in quantization.get("notes", []):
            print(f"NOTE {candidate.name}: {note}")
        for kept in quantization.get("kept", []):
            if not kept["name"].endswith("lm_head"):
                print(f"KEPT {candidate.name}: {kept['name']} ({kept['reason']})")
    if result.reload is not None:
        r = result.reload
        if r.loaded:
            print(f"transformers reload: max |delta logit| = {r.max_abs_diff:.2e} (tolerance {r.tolerance:g})")
        else:
            print(f"WARNING transformers could not reload the artifact: {r.reason}")
    print(f"artifact: {result.output}")
    if not result.gates_passed:
        failed = [g for g in result.gates if not g.passed]
        for g in failed:
            print(f"GATE FAILED: {g.message}", file=sys.stderr)
        return EXIT_GATE_FAILED
    return EXIT_OK


def _cmd_recipe(args: argparse.Namespace) -> int:
    from .recipe import dump_recipe, load_recipe

    print(dump_recipe(load_recipe(args.recipe, args.overrides)), end="")
    return EXIT_OK


COMMANDS = {"run": _cmd_run, "recipe": _cmd_recipe}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if args.command is None:
        parser.print_help()
        return EXIT_INPUT
    try:
        return COMMANDS[args.command](args)
    except DsqInputError as exc:
        print(f"dsq: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except DsqError as exc:
        print(f"dsq: failed: {exc}", file=sys.stderr)
        return EXIT_INPUT


if __name__ == "__main__":
    sys.exit(main())
