"""Preflight: config.json, safetensors headers and tokenizer checked against each other.

Everything here runs before any weight is read, so a checkpoint that disagrees with itself fails at
once with a message naming the key, the tensor or the file, instead of as a traceback deep in
transformers or as silently wrong numbers at the end of a run. The checks live by concern:

* :mod:`dsq.core.config_checks`: the numeric fields of ``config.json`` (:func:`check_config_types`)
  and the model it describes, built on the ``meta`` device (:func:`model_facts`).
* :mod:`dsq.core.safetensors_header`: each safetensors header parsed and validated once
  (:func:`~dsq.core.safetensors_header.read_header`).
* :mod:`dsq.core.header_checks`: the headers against the model (:func:`check_headers_against_config`,
  :func:`check_expert_counts`).
* :mod:`dsq.core.tokenizer_check`: no token id beyond ``vocab_size`` (:func:`check_tokenizer`).

The recipe against the model is :mod:`dsq.run.preflight`. This module gathers the public names of
the checkpoint checks under one import.
"""
from __future__ import annotations

from dsq.core.config_checks import (
    CONFIG_FIELDS,
    MAX_NAMED_KEYS,
    BoolField,
    FloatField,
    IntField,
    ModelFacts,
    check_config_types,
    index_ranges,
    is_int,
    model_facts,
    name_some,
)
from dsq.core.header_checks import (
    EXPERT_COUNT_KEYS,
    EXPERT_KEY,
    FLOAT_DTYPES,
    MTP_MARKERS,
    SCALE_DTYPES,
    HeaderCheck,
    check_expert_counts,
    check_headers_against_config,
    describe_missing,
)
from dsq.core.safetensors_header import StoredTensor, stored_tensors
from dsq.core.tokenizer_check import check_tokenizer

__all__ = [
    "CONFIG_FIELDS",
    "EXPERT_COUNT_KEYS",
    "EXPERT_KEY",
    "FLOAT_DTYPES",
    "MAX_NAMED_KEYS",
    "MTP_MARKERS",
    "SCALE_DTYPES",
    "BoolField",
    "FloatField",
    "HeaderCheck",
    "IntField",
    "ModelFacts",
    "StoredTensor",
    "check_config_types",
    "check_expert_counts",
    "check_headers_against_config",
    "check_tokenizer",
    "describe_missing",
    "index_ranges",
    "is_int",
    "model_facts",
    "name_some",
    "stored_tensors",
]
