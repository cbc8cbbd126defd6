"""Orchestration: recipes, the run of a recipe (PTQ, streamed, QAT, LoRA), export and validation, and the one run tail.

Imports the ground floor and the stages; no stage imports it.
"""
