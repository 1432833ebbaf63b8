"""FHIR R4 RESTful interactions (FHIR R4 §3.1.0 "RESTful API") over the store.

Handlers parse HTTP and call exactly one method here; this layer validates, resolves references,
checks versions, asks the gate for the caller's scope, writes through :mod:`gateway.store.fhir_repo`
and reports every access to the audit sink.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from typing import Any, Iterable
from urllib.parse import parse_qsl

import orjson

from gateway.context import Requester
from gateway.ids import new_id
from gateway.errors import (BadRequest, Conflict, Forbidden, GatewayError, Gone, NotFound, PreconditionFailed,
                            Unprocessable)
from gateway.services.access import (AccessRecord, Action, AuditSink, Gate, Interaction, Outcome, require_type,
                                     require_write)
from gateway.store.access import Access, AccessLayer
from gateway.store import fhir_repo as repo
from gateway.store.db import Database
from gateway.store.scope import AccessScope
from mappings.dates import DateFormatError, parse_range
from mappings.fhir.references import ID_RE
from mappings.fhir.compartment import PATIENT_COMPARTMENT
from mappings.fhir.jsonpatch import PatchError, apply_patch
from mappings.fhir.search import MAX_OFFSET, SearchError, SearchQuery, parse_search, version_number
from gateway.services.search_cursor import CursorCodec
from gateway.services.validation import ModelValidator
from mappings.fhir.validate import InvalidResource, known_type, validate_resource

log = logging.getLogger(__name__)


def invalid_error(exc: InvalidResource) -> GatewayError:
    cls = BadRequest if exc.structural else Unprocessable
    return cls(str(exc), expression=[i.expression for i in exc.issues], details=exc.issues)


def parse_etag(value: str | None) -> int | None:
    """Version from ``W/"3"`` / ``"3"`` / ``3``."""
    if value is None:
        return None
    v = value.strip()
    if v.startswith("W/"):
        v = v[2:]
    v = v.strip('"')
    if not v.isdigit():
        raise BadRequest(f"If-Match: {value!r} is not a version ETag like W/\"1\"")
    return int(v)


@dataclass(slots=True)
class WriteOutcome:
    stored: repo.Stored
    created: bool
    #: For conditional create that matched an existing resource.
    existing: bool = False


class FhirService:
    def __init__(
        self, db: Database, gate: Gate, audit: AuditSink, *, default_count: int = 50, max_count: int = 1000,
        validator: ModelValidator | None = None, access: AccessLayer | None = None, cursor_key: bytes | None = None,
    ) -> None:
        self.db = db
        #: keyset cursors of the searches' next links (a per-instance key unless the composition root gives the
        #: server's: then every serving process accepts the others' cursors)
        self.cursors = CursorCodec(cursor_key or secrets.token_bytes(32))
        #: the one access layer: every read below gets its query builder from it
        self.access = access or AccessLayer(db, gate, audit)
        self.validator = validator or ModelValidator(0)
        self.gate = gate
        self.audit = audit
        self.default_count = default_count
        self.max_count = max_count

    # -- helpers -------------------------------------------------------------------------------
    def check_type(self, res_type: str) -> None:
        if not known_type(res_type):
            raise NotFound(f"resource type {res_type!r} is not a FHIR R4 resource type")

    async def _audit(self, requester: Requester, action: Action, interaction: Interaction, outcome: Outcome,
                     stored: Iterable[repo.Stored] = (), scope: AccessScope | None = None, detail: str = "") -> None:
        items = list(stored)
        await self.audit.record(
            AccessRecord(
                requester, action, interaction, outcome,
                tuple(f"{s.res_type}/{s.res_id}" for s in items[:200]),
                tuple(sorted({s.patient_id for s in items if s.patient_id}))[:200],
                scope.summary if scope else "", detail,
            )
        )

    def parse_search(self, res_type: str, pairs: list[tuple[str, str]], lenient: bool = False) -> SearchQuery:
        try:
            return parse_search(res_type, pairs, default_count=self.default_count, max_count=self.max_count,
                                lenient=lenient)
        except SearchError as exc:
            raise BadRequest(str(exc), expression=[exc.param]) from None

    # -- read ----------------------------------------------------------------------------------
    # Every read goes through the access layer (gateway.store.access): the requester's Access
    # (the gate's scope) builds the query.  For a research (restricted) scope a deleted resource, and
    # every version of it, answers 404 exactly like one that never existed (no 410, no version leak);
    # treatment and site scopes keep FHIR's 410 Gone.

    async def open(self, requester: Requester) -> Access:
        return await self.access.open(requester)

    async def read(self, requester: Requester, res_type: str, res_id: str, *, access: Access | None = None,
                   conn=None) -> repo.Stored:
        self.check_type(res_type)
        require_type(requester, res_type)
        access = access or await self.open(requester)
        if conn is None:
            async with access.read() as c:
                cur = await repo.get_visible(c, access.scope, res_type, res_id)
        else:
            cur = await repo.get_visible(conn, access.scope, res_type, res_id)
        ref = (f"{res_type}/{res_id}",)
        if cur is None or (cur.deleted and access.restricted):
            await access.record(Action.READ, Interaction.READ, Outcome.MINOR_FAILURE, resources=ref,
                                detail="not found or not permitted")
            raise NotFound(f"{res_type}/{res_id} is not known")
        if cur.deleted:
            await access.record(Action.READ, Interaction.READ, Outcome.MINOR_FAILURE, resources=ref, detail="deleted")
            raise Gone(f"{res_type}/{res_id} was deleted", headers={"ETag": cur.etag})
        await access.record(Action.READ, Interaction.READ, Outcome.SUCCESS, resources=ref, patients=(cur.patient_id,))
        return cur

    async def vread(self, requester: Requester, res_type: str, res_id: str, version: str, *,
                    access: Access | None = None, conn=None) -> repo.Stored:
        self.check_type(res_type)
        require_type(requester, res_type)
        access = access or await self.open(requester)
        ref = (f"{res_type}/{res_id}",)
        st = None
        if version_number(version) is not None:  # not digits, or beyond 64 bits: never a stored version
            scope = access.scope if access.restricted else None
            if conn is None:
                async with access.read() as c:
                    st = await repo.get_version(c, res_type, res_id, int(version), scope)
            else:
                st = await repo.get_version(conn, res_type, res_id, int(version), scope)
        if st is None or (st.deleted and access.restricted):
            await access.record(Action.READ, Interaction.VREAD, Outcome.MINOR_FAILURE, resources=ref,
                                detail="not found or not permitted")
            raise NotFound(f"{res_type}/{res_id}/_history/{version} is not known")
        if st.deleted:
            await access.record(Action.READ, Interaction.VREAD, Outcome.MINOR_FAILURE, resources=ref, detail="deleted")
            raise Gone(f"{res_type}/{res_id}/_history/{version} is a deletion", headers={"ETag": st.etag})
        await access.record(Action.READ, Interaction.VREAD, Outcome.SUCCESS, resources=ref, patients=(st.patient_id,))
        return st

    # -- search & history ------------------------------------------------------------------------
    async def search(self, requester: Requester, q: SearchQuery, *, access: Access | None = None,
                     conn=None) -> repo.SearchResult:
        self.check_type(q.res_type)
        require_type(requester, q.res_type)
        if q.cursor is not None:
            self.cursors.open(q, requester)  # 400 unless issued for this search and requester
        access = access or await self.open(requester)
        if conn is None:
            async with access.read() as c:
                result = await repo.search(c, q, access.scope)
        else:
            result = await repo.search(conn, q, access.scope)
        if requester.resource_types is not None:  # _include/_revinclude of types the scopes do not grant
            result.included = [s for s in result.included if s.res_type in requester.resource_types]
        if result.more and result.last_key is not None:
            start = q.position if q.after is not None else q.offset
            result.next_cursor = self.cursors.issue(q, requester, result.last_key, start + len(result.matches))
        items = result.matches + result.included
        await access.record(Action.EXECUTE, Interaction.SEARCH_TYPE, Outcome.SUCCESS,
                            resources=[f"{s.res_type}/{s.res_id}" for s in items],
                            patients=[s.patient_id for s in items], detail=q.res_type)
        return result

    async def compartment_search(self, requester: Requester, patient_id: str, q: SearchQuery) -> repo.SearchResult:
        """``GET Patient/{id}/{type}`` (FHIR R4 §3.1.1.1.5): the search restricted to the patient's compartment
        (R4 Patient CompartmentDefinition); the consent gate applies as to any search."""
        if q.res_type not in PATIENT_COMPARTMENT:
            raise BadRequest(f"{q.res_type} is not in the Patient compartment (R4 CompartmentDefinition)")
        q.compartment = patient_id
        return await self.search(requester, q)

    async def system_search(self, requester: Requester, types: list[str], pairs: list[tuple[str, str]],
                            lenient: bool = False) -> tuple[repo.SearchResult, int, int]:
        """``GET [base]?_type=A,B&...`` (FHIR R4 §3.1.0.9 "search-system"): the same criteria on each type,
        results in ``_type`` order, one page (``_count``/``_offset``) over them all. Returns (result, count, offset)."""
        if not types:
            raise BadRequest("system search needs _type (a comma-separated list of resource types)",
                             expression=["_type"])
        for t in types:
            self.check_type(t)
            require_type(requester, t)
        paging = [(k, v) for k, v in pairs if k in ("_count", "_offset")]
        criteria = [(k, v) for k, v in pairs if k not in ("_count", "_offset")]
        probe = self.parse_search(types[0], paging, lenient=lenient)
        count, offset = probe.count, probe.offset
        matches: list[repo.Stored] = []
        included: list[repo.Stored] = []
        total = 0
        access = await self.open(requester)  # the access layer: its scope in every query, one audit record
        async with access.read() as conn:
            for t in types:
                q = self.parse_search(t, criteria, lenient=lenient)
                q.count, q.offset, q.total = min(offset + count, self.max_count), 0, "accurate"
                res = await repo.search(conn, q, access.scope)
                total += res.total or 0
                matches += res.matches
                included += [s for s in res.included
                             if requester.resource_types is None or s.res_type in requester.resource_types]
        page = matches[offset:offset + count]
        await access.record(Action.EXECUTE, Interaction.SEARCH_SYSTEM, Outcome.SUCCESS,
                            resources=[f"{s.res_type}/{s.res_id}" for s in page + included],
                            patients=[s.patient_id for s in page + included], detail=",".join(types))
        return repo.SearchResult(page, total, included), count, offset

    async def everything(self, requester: Requester, patient_id: str, types: list[str] | None) -> list[repo.Stored]:
        """``Patient/{id}/$everything`` (FHIR R4 Patient-everything): the Patient and every resource in its
        compartment (R4 CompartmentDefinition types; ``_type`` narrows), each type capped at ``max_count``, and
        (without ``_type``) the resources outside the compartment that those reference (the operation's "any
        resource referenced"), through the same gate.
        The Patient is read through the gate first: one the caller may not see is a 404."""
        access = await self.open(requester)
        granted = requester.resource_types
        # the Patient read decides visibility (404); a token granted other types only still needs it to exist
        patient = await self.read(replace(requester, resource_types=None), "Patient", patient_id, access=access)
        for t in types or ():
            if t not in PATIENT_COMPARTMENT:
                raise BadRequest(f"_type {t!r} is not in the Patient compartment", expression=["_type"])
        want = [t for t in types or PATIENT_COMPARTMENT if granted is None or t in granted]
        out = [patient] if "Patient" in want else []
        async with access.read() as conn:
            for t in want:
                if t == "Patient":
                    continue
                q = SearchQuery(t, count=self.max_count, total="none", compartment=patient_id)
                out += (await repo.search(conn, q, access.scope)).matches
            if not types:  # and what they reference outside the compartment (Practitioner, Organization, ...)
                out += [s for s in await repo.referenced(conn, out, access.scope, skip_types=PATIENT_COMPARTMENT)
                        if granted is None or s.res_type in granted]
        await access.record(Action.READ, Interaction.OPERATION, Outcome.SUCCESS, detail="$everything",
                            resources=[f"{s.res_type}/{s.res_id}" for s in out], patients=[s.patient_id for s in out])
        return out

    async def history(self, requester: Requester, res_type: str | None, res_id: str | None,
                      pairs: list[tuple[str, str]]) -> tuple[list[repo.Stored], int, int, int]:
        if res_type:
            self.check_type(res_type)
            require_type(requester, res_type)
        elif requester.resource_types is not None:
            raise Forbidden("system history spans every type; the token's SMART scopes grant "
                            f"{', '.join(sorted(requester.resource_types))} only")
        count, offset, since = self.default_count, 0, None
        for k, v in pairs:
            try:
                if k == "_count":
                    if int(v) < 0:
                        raise BadRequest("history parameter '_count': must be ≥ 0", expression=[k])
                    count = min(int(v), self.max_count)
                elif k == "_offset":
                    offset = max(int(v), 0)
                    if offset > MAX_OFFSET:
                        raise BadRequest(f"history parameter '_offset': must be at most {MAX_OFFSET}", expression=[k])
                elif k == "_since":
                    since = parse_range(v)[0]
                elif k in ("_format", "_pretty"):
                    pass
                else:
                    raise BadRequest(f"history parameter {k!r} is not supported (use _count, _since)", expression=[k])
            except (ValueError, DateFormatError) as exc:
                if isinstance(exc, BadRequest):
                    raise
                raise BadRequest(f"history parameter {k!r}: {exc}", expression=[k]) from None
        access = await self.open(requester)
        kind = (Interaction.HISTORY_INSTANCE if res_id else Interaction.HISTORY_TYPE if res_type
                else Interaction.HISTORY_SYSTEM)
        async with access.read() as conn:
            if res_id:
                cur = await repo.get_visible(conn, access.scope, res_type, res_id)
                if cur is None or (cur.deleted and access.restricted):
                    await access.record(Action.READ, kind, Outcome.MINOR_FAILURE,
                                        resources=(f"{res_type}/{res_id}",), detail="not found or not permitted")
                    raise NotFound(f"{res_type}/{res_id} is not known")
            rows, total = await repo.history(conn, access.scope, res_type=res_type, res_id=res_id, since=since,
                                             count=count, offset=offset)
        await access.record(Action.READ, kind, Outcome.SUCCESS,
                            resources=[f"{s.res_type}/{s.res_id}" for s in rows], patients=[s.patient_id for s in rows])
        return rows, total, count, offset

    # -- write ---------------------------------------------------------------------------------
    async def create(self, requester: Requester, res_type: str, body: Any, if_none_exist: str | None) -> WriteOutcome:
        require_write(requester)  # analysts read only
        self.check_type(res_type)
        require_type(requester, res_type)
        resource = self._validated(body, res_type)
        access = None
        if if_none_exist:  # conditional create: the criteria are searched, so the requester's access counts
            access = await self.open(requester)
            await self.conditional_allowed(access, "If-None-Exist")
        async with self.db.write() as conn:
            if if_none_exist:
                found = await self._conditional_match(conn, access, res_type, if_none_exist, "If-None-Exist")
                if found is not None:
                    await self._audit(requester, Action.READ, Interaction.CREATE, Outcome.SUCCESS, [found],
                                      detail="conditional: exists")
                    return WriteOutcome(found, created=False, existing=True)
            res_id = new_id()
            [stored] = await repo.apply_writes(conn, [repo.Write(res_type, res_id, resource, None, "POST")])
        await self._audit(requester, Action.CREATE, Interaction.CREATE, Outcome.SUCCESS, [stored])
        return WriteOutcome(stored, created=True)

    async def update(self, requester: Requester, res_type: str, res_id: str, body: Any, if_match: str | None) -> WriteOutcome:
        require_write(requester)  # analysts read only
        self.check_type(res_type)
        require_type(requester, res_type)
        if not ID_RE.match(res_id):
            raise BadRequest(f"id {res_id!r} must match [A-Za-z0-9\\-.]{{1,64}}")
        resource = self._validated(body, res_type)
        if resource.get("id") != res_id:
            raise BadRequest(f"{res_type}.id {resource.get('id')!r} must equal the id in the URL ({res_id!r})",
                             expression=[f"{res_type}.id"])
        want = parse_etag(if_match)
        access = await self.open(requester)  # a research scope may update only what it may read
        async with self.db.write() as conn:
            await repo.lock_resources(conn, [(res_type, res_id)])
            prev, hidden = await self.current_for_write(conn, access, res_type, res_id)
            if hidden:
                raise await self.hidden(access, Interaction.UPDATE, res_type, res_id)
            if want is not None and (prev is None or prev.version != want):
                raise PreconditionFailed(
                    f"If-Match version {want} does not match current version "
                    f"{prev.version if prev else 'none'} of {res_type}/{res_id}"
                )
            try:
                [stored] = await repo.apply_writes(conn, [repo.Write(res_type, res_id, resource, prev, "PUT")])
            except repo.VersionConflict:
                raise Conflict(f"{res_type}/{res_id} was changed concurrently; retry") from None
        created = prev is None or prev.deleted
        await self._audit(requester, Action.CREATE if created else Action.UPDATE, Interaction.UPDATE, Outcome.SUCCESS,
                          [stored])
        return WriteOutcome(stored, created=created)

    async def patch(self, requester: Requester, res_type: str, res_id: str, ops: Any,
                    if_match: str | None) -> WriteOutcome:
        """patch: JSON Patch (RFC 6902) on the current version (FHIR R4 §3.1.0.6), then an update with
        If-Match (the caller's, else the version patched: a concurrent change → 412, never lost)."""
        require_write(requester)
        cur = await self.read(requester, res_type, res_id)  # the gate: a resource the caller may not see is 404
        want = parse_etag(if_match)
        if want is not None and want != cur.version:  # before the patch: it was written against that version
            raise PreconditionFailed(f"If-Match version {want} does not match current version {cur.version} "
                                     f"of {res_type}/{res_id}")
        try:
            patched = apply_patch(orjson.loads(cur.content), ops)
        except PatchError as exc:
            expr = [f"Patch[{exc.index}]"] if exc.index is not None else None
            raise (Unprocessable if exc.kind == "test" else BadRequest)(str(exc), expression=expr) from None
        if patched.get("resourceType") != res_type or patched.get("id") != res_id:
            raise Unprocessable("a patch may not change resourceType or id")
        return await self.update(requester, res_type, res_id, patched, if_match or f'W/"{cur.version}"')

    async def delete(self, requester: Requester, res_type: str, res_id: str) -> repo.Stored | None:
        require_write(requester)  # analysts read only
        self.check_type(res_type)
        require_type(requester, res_type)
        access = await self.open(requester)  # a research scope may delete only what it may read
        async with self.db.write() as conn:
            await repo.lock_resources(conn, [(res_type, res_id)])
            prev, hidden = await self.current_for_write(conn, access, res_type, res_id)
            if hidden:  # answered like deleting nothing; the resource is left as it is
                await self.hidden(access, Interaction.DELETE, res_type, res_id)
                return None
            if prev is None or prev.deleted:
                return None  # idempotent: deleting nothing succeeds (FHIR R4 §3.1.0.7.1)
            [stored] = await repo.apply_writes(conn, [repo.Write(res_type, res_id, None, prev, "DELETE")])
        await self._audit(requester, Action.DELETE, Interaction.DELETE, Outcome.SUCCESS, [prev])
        return stored

    # A research (restricted) scope writes by id only what it may read: a resource it may not see, a
    # deleted one and one that never existed are the same to it — an update answers 404 (no creation with a
    # client-assigned id), a delete answers like deleting nothing — and the hidden resource is never
    # changed.  Treatment and site scopes write as FHIR says (update-as-create, 201 vs 200).
    @staticmethod
    async def current_for_write(conn, access: Access, res_type: str, res_id: str) -> tuple[repo.Stored | None, bool]:
        """(the current row a write by id replaces, whether it is hidden from ``access``)."""
        if not access.restricted:
            return await repo.get_current(conn, res_type, res_id), False
        prev = await repo.get_visible(conn, access.scope, res_type, res_id)
        if prev is None or prev.deleted:
            return None, True
        return prev, False

    @staticmethod
    async def hidden(access: Access, interaction: Interaction, res_type: str, res_id: str) -> NotFound:
        """Audit a write by id refused as hidden and return the 404 to raise (the same for every cause)."""
        await access.record(Action.UPDATE if interaction == Interaction.UPDATE else Action.DELETE, interaction,
                            Outcome.MINOR_FAILURE, resources=(f"{res_type}/{res_id}",),
                            detail="not found or not permitted")
        return NotFound(f"{res_type}/{res_id} is not known")

    def _validated(self, body: Any, res_type: str) -> dict[str, Any]:
        try:
            return validate_resource(body, expected_type=res_type)
        except InvalidResource as exc:
            raise invalid_error(exc) from None

    async def conditional_allowed(self, access: Access, what: str) -> None:
        """Conditional operations (If-None-Exist, conditional update/delete/references) match the criteria
        over *every* resource, and their outcome (created or not, which id) would tell a research scope
        about resources it may not see: they need an unrestricted (treatment or site)
        purpose.  Refused, audited, whatever the criteria match — no existence oracle."""
        if access.restricted:
            await access.record(Action.CREATE, Interaction.CREATE, Outcome.MINOR_FAILURE,
                                detail=f"conditional operation ({what}) refused for a research purpose")
            raise Forbidden(f"{what}: conditional operations need a treatment purpose (a research purpose may "
                            "not search resources it is not permitted to see)")

    async def _conditional_match(self, conn, access: Access, res_type: str, query: str, what: str,
                                 lock: bool = True) -> repo.Stored | None:
        pairs = parse_qsl(query.lstrip("?"), keep_blank_values=True)
        if not pairs:
            raise BadRequest(f"{what}: empty search criteria")
        q = self.parse_search(res_type, pairs)
        if lock:  # vs. the same condition in another process (conditional create/update/delete)
            await repo.lock_conditions(conn, [(res_type, query)])
        q.count, q.total = 2, "none"
        result = await repo.search(conn, q, access.scope)  # (unrestricted: conditional_allowed passed)
        if len(result.matches) > 1:
            raise PreconditionFailed(f"{what}: criteria match more than one {res_type}")
        return result.matches[0] if result.matches else None

    # -- batch / transaction ----------------------------------------------------------------------
    async def bundle(self, requester: Requester, body: Any) -> dict[str, Any]:
        """Process a batch or transaction Bundle (FHIR R4 §3.1.0.11)."""
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            raise BadRequest("POST to the base expects a Bundle of type batch or transaction",
                             expression=["Bundle.resourceType"])
        btype = body.get("type")
        if btype not in ("batch", "transaction"):
            raise BadRequest(f"Bundle.type must be batch or transaction, not {btype!r}", expression=["Bundle.type"])
        entries = body.get("entry") or []
        if not isinstance(entries, list):
            raise BadRequest("Bundle.entry must be a list", expression=["Bundle.entry"])
        if btype == "transaction":
            return await self._transaction(requester, entries)
        return await self._batch(requester, entries)

    async def _batch(self, requester: Requester, entries: list) -> dict[str, Any]:
        from gateway.services.fhir_bundle import batch_entry_response, error_entry

        out = []
        for i, entry in enumerate(entries):
            try:
                out.append(await batch_entry_response(self, requester, i, entry))
            except GatewayError as exc:
                out.append(error_entry(exc))
        return {"resourceType": "Bundle", "id": new_id(), "type": "batch-response", "entry": out}

    async def _transaction(self, requester: Requester, entries: list) -> dict[str, Any]:
        require_write(requester)  # analysts read only
        if requester.resource_types is not None:
            raise Forbidden("a transaction may touch any type; the token's SMART scopes grant "
                            f"{', '.join(sorted(requester.resource_types))} only (use a batch)")
        from gateway.services.fhir_bundle import TransactionPlan

        plan = TransactionPlan(self, entries)
        plan.access = await self.open(requester)  # GET entries and conditional operations: the requester's access
        plan.prepare(check_models=False)  # envelopes, ids, fullUrls (cheap)
        await plan.check_models(self.validator)  # the expensive model validation, off the event loop
        async with self.db.write() as conn:
            response = await plan.execute(conn)
        self.db.note_writes(len(plan.stored))
        await self._audit(requester, Action.CREATE, Interaction.TRANSACTION, Outcome.SUCCESS, plan.stored)
        return response
