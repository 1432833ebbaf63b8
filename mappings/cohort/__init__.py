"""Cohort definitions: the JSON language (:mod:`.language`); its SQL compiler is ``gateway.store.cohort``."""

from mappings.cohort.language import CohortError, Expander, Node, parse

__all__ = ["CohortError", "Expander", "Node", "parse"]
