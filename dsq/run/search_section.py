"""The recipe's ``search:`` section: which schemes each module may take, and what the search optimises."""
from __future__ import annotations

from pydantic import Field, field_validator

from dsq.core.schema import Strict
from dsq.quantize.scheme import KEEP, parse_scheme_or_keep
from dsq.quantize.sections import CalibrationSection


def _sensitivity_data() -> CalibrationSection:
    return CalibrationSection(samples=8, seq_len=128, batch_size=4)


class SearchSection(Strict):
    """``dsq search``: per-module schemes allocated from measured sensitivities and verified against ``eval.gates``.

    ``max_bytes: null`` finds the smallest artifact that passes the gates; a number finds the most accurate one
    whose quantized weights take at most that many bytes on disk (and that passes the gates).
    """

    candidates: list[str] = Field(default_factory=lambda: ["int4-g128", "int8-ch", KEEP], min_length=2, max_length=16)
    max_bytes: int | None = Field(None, ge=1)  # weight bytes on disk; None: the smallest passing artifact
    references: bool = True  # also verify every module at each quantizing candidate (uniform points of the table)
    max_trials: int = Field(12, ge=1, le=64)  # verified end-to-end runs at most, references included
    calibration: CalibrationSection = Field(default_factory=_sensitivity_data)  # the windows sensitivities are measured on

    @field_validator("candidates")
    @classmethod
    def _candidates_parse(cls, values: list[str]) -> list[str]:
        for v in values:
            parse_scheme_or_keep(v)
        if len(set(values)) != len(values):
            raise ValueError("candidates must be distinct")
        return values
