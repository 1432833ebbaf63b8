"""Cohort definitions: the JSON language (:mod:`.language`) and its SQL compiler (:mod:`.compiler`)."""

from mappings.cohort.compiler import compile_cohort
from mappings.cohort.language import CohortError, Node, parse

__all__ = ["CohortError", "Node", "compile_cohort", "parse"]
