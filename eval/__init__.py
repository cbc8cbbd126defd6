"""Evaluation of compressed models against their original.

Benchmarks (perplexity, multiple choice, fidelity), size and memory measurements, the transformers
reload check, quality gates, and reports. Data comes from local files; configuration comes from the
caller. A report is one typed object (:class:`Report`, or :class:`NotEvaluatedReport`) whose rows
carry the stage facts (:class:`QuantizationFacts`, :class:`ReloadCheck`, :class:`OnnxFacts`, ...);
:func:`write_report` writes all of its files.
"""
from dsq.eval.data import MCItem, load_multiple_choice, load_text, tokenize_text
from dsq.eval.facts import (
    SQNR_KEY, ArtifactQuantization, ExactMerge, LoraFacts, OnnxFacts, QuantizationFacts, ReloadNotRun, RequantizedMerge,
    StreamingFacts, TrainingFacts, weight_sqnr_summary,
)
from dsq.eval.fidelity import FidelityResult, ReferenceLogprobs, compare_to_reference, reference_logprobs
from dsq.eval.gates import GateResult, Gates, check_gates
from dsq.eval.harness import BenchmarkSuite, Evaluator, ModelMetrics
from dsq.eval.memory import PeakCUDA, PeakRSS, dir_bytes, files_bytes, machine_info, weight_bytes_in_memory
from dsq.eval.multiple_choice import FewShot, MCResult, fewshot_prompts, multiple_choice
from dsq.eval.perplexity import PerplexityConfig, PerplexityResult, perplexity
from dsq.eval.reload import ReloadCheck, transformers_reload_check
from dsq.eval.report import NotEvaluatedReport, Report, report_to_dict
from dsq.eval.report_files import WrittenReport, write_report
from dsq.eval.report_tables import format_terminal_table

__all__ = [
    "SQNR_KEY",
    "ArtifactQuantization",
    "BenchmarkSuite",
    "Evaluator",
    "ExactMerge",
    "FewShot",
    "FidelityResult",
    "GateResult",
    "Gates",
    "LoraFacts",
    "MCItem",
    "MCResult",
    "ModelMetrics",
    "NotEvaluatedReport",
    "OnnxFacts",
    "PeakCUDA",
    "PeakRSS",
    "PerplexityConfig",
    "PerplexityResult",
    "QuantizationFacts",
    "ReferenceLogprobs",
    "ReloadCheck",
    "ReloadNotRun",
    "Report",
    "RequantizedMerge",
    "StreamingFacts",
    "TrainingFacts",
    "WrittenReport",
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
    "transformers_reload_check",
    "weight_bytes_in_memory",
    "weight_sqnr_summary",
    "write_report",
]
