"""Evaluation of compressed models against their original.

Benchmarks (perplexity, multiple choice, fidelity), size and memory measurements, quality
gates, and reports. Data comes from local files; configuration comes from the caller.
"""
from dsq.eval.data import MCItem, load_multiple_choice, load_text, tokenize_text
from dsq.eval.fidelity import FidelityResult, ReferenceLogprobs, compare_to_reference, reference_logprobs
from dsq.eval.gates import GateResult, Gates, check_gates
from dsq.eval.harness import BenchmarkSuite, Evaluator, ModelMetrics
from dsq.eval.memory import PeakCUDA, PeakRSS, dir_bytes, files_bytes, machine_info, weight_bytes_in_memory
from dsq.eval.multiple_choice import FewShot, MCResult, fewshot_prompts, multiple_choice
from dsq.eval.perplexity import PerplexityConfig, PerplexityResult, perplexity
from dsq.eval.report import (
    Report, format_terminal_table, report_to_dict, weight_sqnr_summary, write_html_report, write_report,
)

__all__ = [
    "BenchmarkSuite",
    "Evaluator",
    "FewShot",
    "FidelityResult",
    "GateResult",
    "Gates",
    "MCItem",
    "MCResult",
    "ModelMetrics",
    "PeakCUDA",
    "PeakRSS",
    "PerplexityConfig",
    "PerplexityResult",
    "ReferenceLogprobs",
    "Report",
    "check_gates",
    "compare_to_reference",
    "dir_bytes",
    "fewshot_prompts",
    "files_bytes",
    "format_terminal_table",
    "load_multiple_choice",
    "load_text",
    "machine_info",
    "multiple_choice",
    "perplexity",
    "reference_logprobs",
    "report_to_dict",
    "tokenize_text",
    "weight_bytes_in_memory",
    "weight_sqnr_summary",
    "write_html_report",
    "write_report",
]
