"""``fedgate consent evaluate``: evaluate DUO consent decisions from JSON on stdin.

Contract (docs/consent.md, "CLI"):

* Input: one JSON object ``{"consent": {...}, "purpose": {...}, "requester": {...},
  "disease_ancestors": {...}, "today": "YYYY-MM-DD"}`` (pretty-printed over several lines is fine),
  or JSON Lines (one such object per line), or a JSON array of such objects.  The whole input is
  first parsed as one JSON value; if that fails it is read as JSON Lines (blank lines skipped).
* Output: one compact JSON line ``{"decision": "permit"|"deny"|"indeterminate", "reasons": [...]}``
  per input object, in input order.
* A malformed object (invalid JSON, wrong type, missing ``consent``/``purpose``/``permission``) yields
  ``{"decision": "indeterminate", "reasons": ["line N: ..."]}`` in its place (``item N`` for array
  input), never a permit.
* Exit status: 0 when every object was well-formed (whatever the decisions), 2 when at least one was
  malformed (or the input was empty), 1 when the DUO release or a ``--disease-ontology`` file could
  not be loaded (nothing is printed).
* ``today`` (optional, ISO date) fixes the evaluation date for TS/MOR; default: the local date.
* CURIEs and OBO IRIs are accepted everywhere.  Unknown requester fields are ignored; missing ones
  are not attested.  ``disease_ancestors`` maps a disease to its superclasses; configured
  ``--disease-ontology`` files take precedence over it for codes they know.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import date
from typing import TextIO
from xml.sax import SAXException

from rdflib.exceptions import ParserError

from ontologies.diseases import (
    ClosureHierarchy,
    CompositeHierarchy,
    DiseaseHierarchy,
    load_hierarchy,
    request_supplied_hierarchy,
)
from ontologies.duo_graph import DuoOntology, load_duo
from ontologies.evaluator import (
    INDETERMINATE,
    ConsentInputError,
    ConsentProfile,
    Decision,
    Requester,
    ResearchPurpose,
    evaluate,
)
from ontologies.terms import TermError

__all__ = ["consent_evaluate_main", "evaluate_record", "main"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_LOAD_ERROR = 1
EXIT_MALFORMED = 2


def _parse_today(value: object) -> date | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConsentInputError(f"today: expected an ISO 8601 date string, got {type(value).__name__}")
    try:
        return date.fromisoformat(value.strip())
    except ValueError as err:
        raise ConsentInputError(f"today: invalid ISO 8601 date {value!r}") from err


def evaluate_record(
    record: object,
    ontology: DuoOntology,
    configured: Sequence[DiseaseHierarchy] = (),
    *,
    default_today: date,
) -> Decision:
    """Evaluate one CLI input object (already JSON-decoded).

    :raises ConsentInputError: the object does not follow the contract (message names the field).
    """
    if not isinstance(record, Mapping):
        raise ConsentInputError(f"expected a JSON object, got {type(record).__name__}")
    for required in ("consent", "purpose"):
        if record.get(required) is None:
            raise ConsentInputError(f"{required}: required")
    profile = ConsentProfile.from_json(record["consent"])
    purpose = ResearchPurpose.from_json(record["purpose"])
    requester = Requester.from_json(record.get("requester"))
    supplied = record.get("disease_ancestors")
    parts: list[DiseaseHierarchy] = list(configured)
    if supplied is not None:
        if not isinstance(supplied, Mapping):
            raise ConsentInputError(f"disease_ancestors: expected an object, got {type(supplied).__name__}")
        try:
            parts.append(request_supplied_hierarchy(supplied))
        except (TermError, TypeError) as err:
            raise ConsentInputError(f"disease_ancestors: {err}") from err
    today = _parse_today(record.get("today")) or default_today
    hierarchy: DiseaseHierarchy = CompositeHierarchy(tuple(parts))
    return evaluate(profile, purpose, requester, ontology, hierarchy, today)


def _records(text: str) -> Iterator[tuple[str, object | None, str | None]]:
    """Yield ``(label, value, error)`` per input object (see the module docstring for the rules)."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        whole_error = err
    else:
        if isinstance(whole, list):
            for index, item in enumerate(whole, start=1):
                yield f"item {index}", item, None
        else:
            yield "line 1", whole, None
        return
    lines = text.splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    if first in ("{", "["):
        # A pretty-printed document that is broken, not JSON Lines.
        yield (f"line {whole_error.lineno}", None, f"invalid JSON: {whole_error.msg} (column {whole_error.colno})")
        return
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield f"line {number}", json.loads(line), None
        except json.JSONDecodeError as err:
            yield f"line {number}", None, f"invalid JSON: {err.msg} (column {err.colno})"


def consent_evaluate_main(
    stdin: TextIO,
    stdout: TextIO,
    *,
    duo_path: str | None = None,
    disease_files: Sequence[str] = (),
) -> int:
    """Read consent-evaluation requests from ``stdin``, write one decision line each to ``stdout``.

    Returns the exit status: 0 all well-formed, 2 some malformed / empty input, 1 ontology load
    failure.  See the module docstring and docs/consent.md for the contract.
    """
    try:
        ontology = load_duo(duo_path)
        configured: tuple[ClosureHierarchy, ...] = tuple(load_hierarchy(path) for path in disease_files)
    except (OSError, ValueError, SAXException, ParserError) as err:
        logger.error("cannot load ontologies: %s", err)
        return EXIT_LOAD_ERROR

    today = date.today()
    text = stdin.read()
    status = EXIT_OK
    if not text.strip():
        _emit(stdout, Decision(INDETERMINATE, ("line 1: no input; expected a JSON object or JSON Lines",)))
        return EXIT_MALFORMED
    for label, value, error in _records(text):
        if error is None:
            try:
                decision = evaluate_record(value, ontology, configured, default_today=today)
            except ConsentInputError as err:
                error = str(err)
        if error is not None:
            status = EXIT_MALFORMED
            decision = Decision(INDETERMINATE, (f"{label}: {error}",))
        _emit(stdout, decision)
    return status


def _emit(stdout: TextIO, decision: Decision) -> None:
    stdout.write(json.dumps(decision.to_json(), ensure_ascii=False) + "\n")
    stdout.flush()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ontologies.cli",
        description="GA4GH DUO consent evaluation (docs/consent.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("evaluate", help="read JSON (object, array or JSON Lines) on stdin, print decisions")
    ev.add_argument("--duo", dest="duo_path", default=None, help="DUO OWL file (default: the vendored release)")
    ev.add_argument(
        "--disease-ontology",
        dest="disease_files",
        action="append",
        default=[],
        metavar="FILE",
        help="disease hierarchy (.obo or OWL); repeatable; earlier files take precedence",
    )
    return parser


def main(argv: Sequence[str] | None = None, *, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    """Entry point of ``python -m ontologies.cli evaluate [--disease-ontology FILE ...]``."""
    args = _parser().parse_args(argv)
    if args.command == "evaluate":
        return consent_evaluate_main(
            stdin or sys.stdin,
            stdout or sys.stdout,
            duo_path=args.duo_path,
            disease_files=tuple(args.disease_files),
        )
    return EXIT_MALFORMED  # pragma: no cover - argparse enforces the sub-command


if __name__ == "__main__":
    sys.exit(main())
