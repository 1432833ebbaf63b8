"""The consent gate (DESIGN.md, "The consent gate — one place").

:class:`ConsentGate` implements :class:`gateway.services.access.Gate`:

* treatment purpose: clinical roles (ehr-system, pacs, clinician) and site/admin get an
  unrestricted scope (still audited); an analyst asking for treatment is refused (403).
* research purpose (DUO codes + diseases): analyst, site and admin roles get a restricted scope —
  the set of effective consent-profile keys (``cm_patient.consent_profile``) whose decision is
  *permit* for (purpose, requester attributes, today).  Clinical roles asking research → 403.

An effective profile (``gateway.store.consent_schema``) is the list of DUO entries from the
patient's active Consent resources and the site policy's matching collections; it permits when
*any* entry valid today (``provision.period``/policy period, checked here at request time)
evaluates to permit.  Indeterminate and deny hide the patient (fail closed).  Decisions are cached
per (purpose, requester attributes, date, profile generation), so a request costs dict look-ups
and the store sees ``consent_no IN (...)`` on stamped rows (``AccessScope.row_clause``) or
``consent_profile IN (...)`` through ``cm_patient`` (``AccessScope.patient_clause``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import tomllib
from collections.abc import AsyncIterator
from datetime import date
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable

import orjson
from aiohttp import web
from sqlalchemy import func, select

from gateway import keys
from gateway.context import CLINICAL_ROLES, Requester
from gateway.errors import Forbidden
from gateway.services.access import AccessRecord
from gateway.settings import Settings
from gateway.store.consent_schema import consent_profile, ensure_indexes, recompute, store_policy_doc
from gateway.store.scope import AccessScope, profile_no
from mappings.fhir.consent_duo import Entry, entries_of, parse_policy
from ontologies import ClosureHierarchy, CompositeHierarchy, evaluate, load_duo, load_hierarchy
from ontologies.evaluator import ConsentInputError, Decision, ResearchPurpose
from ontologies.evaluator import Requester as DuoRequester

log = logging.getLogger(__name__)

RESEARCH_ROLES = frozenset({"analyst", "site", "admin"})
TREATMENT_ROLES = CLINICAL_ROLES | {"site", "admin"}


def read_policy_file(path: str | None) -> dict[str, Any]:
    """The site policy document (JSON or TOML by extension); {} without a file."""
    if not path:
        return {}
    text = Path(path).read_text()
    doc = tomllib.loads(text) if path.endswith(".toml") else json.loads(text)
    parse_policy(doc)  # validate now: a bad policy stops start-up with the field named
    return doc


class ConsentGate:
    """DUO consent gate: Requester → AccessScope (a set of permitted profile keys)."""

    def __init__(self, settings: Settings) -> None:
        cfg = dict(settings.extra.get("consent") or {})
        self.policy_doc = read_policy_file(cfg.get("policy"))
        self.disease_files = tuple(cfg.get("disease_ontologies") or ()) + tuple(
            self.policy_doc.get("disease_ontologies") or ())
        self.db = None
        self.ontology = None
        self.diseases = CompositeHierarchy(())
        self._file_parts: tuple = ()
        self._vocab_gen: tuple | None = None
        self._profiles: dict[str, list[Entry]] = {}
        #: profile_no → key, and keys whose number collides with another's (never permitted)
        self._by_no: dict[int, str] = {}
        self._collided: set[str] = set()
        self._scopes: dict[tuple, AccessScope] = {}
        #: combined profile key → its member keys
        self._combos: dict[str, tuple[str, ...]] = {}
        #: (codes, diseases, attributes JSON) → (purpose, requester, their keys): see :meth:`_parse`
        self._parsed: dict[tuple, tuple] = {}
        self._lock = asyncio.Lock()
        self.evaluations = 0
        #: Seconds between checks for new effective profiles.  Safe to cache: a profile key not yet
        #: known is simply not permitted (fail closed), and withdrawal changes cm_patient, which the
        #: SQL reads live — so only a *new* permission can lag by up to this long.
        self.refresh_s = float(cfg.get("refresh_s", 1.0))
        self._checked_at = float("-inf")
        #: AuditSink for refused requests (set by :func:`consent_ctx`).
        self.audit = None

    async def start(self, db, *, one_time: bool = True) -> None:
        """Load DUO and disease hierarchies (off the loop); with ``one_time`` (not in a serving child of
        ``fedgate serve --processes N``, whose parent did it) store the policy, recompute if it changed."""
        self.db = db
        self.ontology = await asyncio.to_thread(load_duo)
        self._file_parts = tuple([await asyncio.to_thread(load_hierarchy, p) for p in self.disease_files])
        self.diseases = CompositeHierarchy(self._file_parts)
        async with db.read() as conn:
            await self._refresh_vocab(conn)
        if not one_time:
            return
        async with db.write() as conn:
            await ensure_indexes(conn)
            if await store_policy_doc(conn, self.policy_doc):
                n = await recompute(conn, None)
                log.info("consent policy changed; recomputed patients", extra={"patients": n})

    async def _refresh_profiles(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.refresh_s:
            return
        self._checked_at = now
        async with self.db.read() as conn:
            await self._refresh_vocab(conn)
            count = (await conn.execute(select(func.count()).select_from(consent_profile))).scalar_one()
            if count == len(self._profiles):
                return
            rows = (await conn.execute(select(consent_profile.c.key, consent_profile.c.profile))).all()
        for key, text in rows:
            if key not in self._profiles:
                doc = orjson.loads(text)
                if isinstance(doc, dict) and "all_of" in doc:
                    # a combined profile (resources linked to several patients): permitted
                    # only when every member profile is (consent_schema.combined_key)
                    self._combos[key] = tuple(doc["all_of"])
                    self._profiles[key] = []
                else:
                    self._profiles[key] = entries_of(doc)
                no = profile_no(key)
                other = self._by_no.setdefault(no, key)
                if other != key:  # two profiles share a row number: permit neither (fail closed)
                    self._collided |= {key, other}
                    log.error("consent profile numbers collide; both profiles are denied")

    async def _refresh_vocab(self, conn) -> None:
        """The disease ontologies loaded in the vocabulary store (``fedgate vocab load``: MONDO, DOID,
        HPO, ...) after the configured files (first match wins); reloaded when a load switches version,
        and the cached decisions with them.  A code no hierarchy knows still fails closed."""
        from gateway.store import vocab_schema

        gen = await vocab_schema.generation(conn)
        if gen == self._vocab_gen:
            return
        closure = await vocab_schema.hierarchies(conn)
        self.diseases = CompositeHierarchy(self._file_parts + (ClosureHierarchy(MappingProxyType(closure), "vocab-store"),))
        self._vocab_gen = gen
        self._scopes.clear()

    def _permits(self, entries: list[Entry], purpose: ResearchPurpose, who: DuoRequester, today: date) -> bool:
        day = today.isoformat()
        for entry in entries:
            if entry.active_on(day):
                self.evaluations += 1
                if evaluate(entry.profile, purpose, who, self.ontology, self.diseases, today).permitted:
                    return True
        return False

    async def effective_profiles(self) -> dict[str, list[Entry]]:
        """Every single (not combined) effective profile the store knows: key → its DUO entries (the consent
        view's rows, issue 28)."""
        await self._refresh_profiles()
        return {k: list(v) for k, v in self._profiles.items() if k not in self._combos and k not in self._collided}

    def explain(self, entries: list[Entry], codes, diseases, attrs: dict) -> list[tuple[Entry, Decision | None]]:
        """The evaluator's decision with its reasons for each entry of a profile (None: the entry is not in
        force today), for ``codes``/``diseases`` asked by a requester with ``attrs`` — what :meth:`scope_for`
        decides, spelled out (the gate permits a profile when any entry in force permits)."""
        wanted, who, _, _ = self._parse(codes, diseases, attrs)
        today = date.today()
        day = today.isoformat()
        return [(e, evaluate(e.profile, wanted, who, self.ontology, self.diseases, today) if e.active_on(day) else None)
                for e in entries]

    #: called with each decision's outcome ("unrestricted" | "restricted" | "refused"): the metrics
    observer: Callable[[str], None] | None = None

    async def scope_for(self, requester: Requester) -> AccessScope:
        try:
            scope = await self._scope_for(requester)
            if requester.patient is not None:  # a SMART patient/ token: that patient's compartment only
                scope = scope.for_patient(requester.patient)
            if self.observer is not None:
                self.observer("unrestricted" if scope.unrestricted else "restricted")
            return scope
        except Forbidden as err:
            if self.observer is not None:
                self.observer("refused")
            if self.audit is not None:
                await self.audit.record(AccessRecord(requester, "E", "access", "4", scope_summary="refused",
                                                     detail=err.message))
            raise

    def _parse(self, codes, diseases, attrs: dict) -> tuple[ResearchPurpose, DuoRequester, str, str]:
        """The evaluator's purpose and requester and their keys, memoised on the exact inputs (codes,
        diseases and the ``repr`` of the sorted attributes — it tells apart what JSON would not, e.g. NaN
        from null, 1 from true): parsing, validating and hashing them was most of a cached request's gate
        time.  Failures are not memoised (refused every time)."""
        try:
            memo = (tuple(codes), tuple(diseases), repr(sorted(attrs.items())))
        except TypeError:  # keys that do not sort: parse every time
            memo = None
        parsed = self._parsed.get(memo) if memo is not None else None
        if parsed is None:
            try:
                who = DuoRequester.from_json(attrs)
                wanted = ResearchPurpose(codes=frozenset(codes), diseases=frozenset(diseases))
            except ConsentInputError as err:
                raise Forbidden(f"requester attributes: {err}") from None
            parsed = (wanted, who, wanted.key(), who.key())
            if memo is not None:
                if len(self._parsed) > 4096:
                    self._parsed.clear()
                self._parsed[memo] = parsed
        return parsed

    async def _scope_for(self, requester: Requester) -> AccessScope:
        purpose = requester.purpose
        if purpose.is_treatment:
            if requester.has_role(*TREATMENT_ROLES):
                return AccessScope(unrestricted=True, summary="treatment: unrestricted")
            raise Forbidden("role 'analyst' may only act for research: give a DUO purpose of use "
                            "(token claim 'purpose' or X-Purpose-Of-Use header)")
        if not requester.has_role(*RESEARCH_ROLES):
            raise Forbidden("clinical roles act for treatment and cannot run research queries")
        if not purpose.codes:
            raise Forbidden("a research request needs a DUO purpose of use")
        attrs = dict(requester.attributes)
        attrs.setdefault("user", requester.subject)
        if requester.organization:
            attrs.setdefault("institution", requester.organization)
        wanted, who, wanted_key, who_key = self._parse(purpose.codes, purpose.diseases, attrs)
        today = date.today()
        await self._refresh_profiles()
        ckey = (wanted_key, who_key, today, len(self._profiles))
        scope = self._scopes.get(ckey)
        if scope is None:
            async with self._lock:
                single = {k for k, entries in self._profiles.items() if k not in self._combos
                          and k not in self._collided and self._permits(entries, wanted, who, today)}
                allowed = frozenset(single | {k for k, members in self._combos.items() if k not in self._collided
                                              and all(m in single for m in members)})
                scope = AccessScope(
                    unrestricted=False, allowed_profiles=allowed,
                    allowed_nos=frozenset(profile_no(k) for k in allowed),
                    summary=f"research {' '.join(sorted(wanted.codes | wanted.diseases))}: "
                            f"{len(allowed)}/{len(self._profiles)} consent profiles permit",
                )
                if len(self._scopes) > 4096:
                    self._scopes.clear()
                self._scopes[ckey] = scope
        return scope


async def consent_ctx(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: start the gate once the store is open (after ``store_ctx`` in gateway/app.py)."""
    gate = app[keys.GATE]
    one_time = app[keys.STARTUP] != "serve"
    if one_time and not isinstance(gate, ConsentGate):  # (ConsentGate.start runs them itself)
        async with app[keys.DB].write() as conn:
            await ensure_indexes(conn)
    if isinstance(gate, ConsentGate):
        gate.audit = app[keys.AUDIT]
        await gate.start(app[keys.DB], one_time=one_time)
    yield


__all__ = ["ConsentGate", "consent_ctx", "read_policy_file"]
