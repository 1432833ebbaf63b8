"""Batch and transaction Bundle processing (FHIR R4 §3.1.0.11 "Batch/Transaction").

A transaction is planned first (parse entries, validate every resource, assign ids, map ``fullUrl``s)
without touching the database, then executed on one write connection: conditional creates and
conditional references are resolved, references rewritten, and every write applied in one batch, so
the whole Bundle commits or nothing does.  Processing order follows the specification: DELETE, POST,
PUT/PATCH, then GET.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from gateway.errors import BadRequest, GatewayError, MethodNotAllowed, NotFound, PreconditionFailed
from gateway.ids import new_id
from gateway.services.audit_codes import Interaction
from gateway.store import fhir_repo as repo
from mappings.fhir.references import ID_RE, rewrite_references
from mappings.fhir.validate import InvalidResource, check_envelope, known_type, validate_resource

if TYPE_CHECKING:  # pragma: no cover
    from gateway.context import Requester
    from gateway.services.fhir import FhirService
    from gateway.services.validation import ModelValidator

METHODS = ("DELETE", "POST", "PUT", "GET")


def _status(code: int) -> str:
    return {200: "200 OK", 201: "201 Created", 204: "204 No Content", 404: "404 Not Found"}.get(code, str(code))


def outcome(exc: GatewayError) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": exc.issue_code, "diagnostics": exc.message,
             **({"expression": exc.expression} if exc.expression else {})}
        ],
    }


def error_entry(exc: GatewayError) -> dict[str, Any]:
    return {"response": {"status": str(exc.status), "outcome": outcome(exc)}}


def _entry_error(i: int, exc: GatewayError) -> GatewayError:
    exc.message = f"Bundle.entry[{i}]: {exc.message}"
    exc.args = (exc.message,)
    exc.expression = [f"Bundle.entry[{i}]"] + list(exc.expression)
    return exc


@dataclass(slots=True)
class Entry:
    index: int
    method: str
    url: str
    res_type: str
    res_id: str | None = None
    query: str | None = None  # conditional / search query
    version: str | None = None
    resource: dict | None = None
    full_url: str | None = None
    if_none_exist: str | None = None
    if_match: str | None = None
    # results
    stored: repo.Stored | None = None
    status: int = 200
    response_resource: dict | None = None


def parse_request(i: int, entry: Any, *, check_model: bool = True) -> Entry:
    if not isinstance(entry, dict):
        raise _entry_error(i, BadRequest("entry must be an object"))
    req = entry.get("request")
    if not isinstance(req, dict) or not req.get("method") or not req.get("url"):
        raise _entry_error(i, BadRequest("request.method and request.url are required"))
    method = str(req["method"]).upper()
    if method not in METHODS:
        raise _entry_error(i, BadRequest(f"request.method {method!r} is not supported (DELETE, POST, PUT, GET)"))
    url = str(req["url"])
    if "$" in url.split("?")[0]:
        raise _entry_error(i, BadRequest(f"request.url {url!r}: FHIR operations ($...) are not supported",
                                         issue_code="not-supported"))
    parts = urlsplit(url)
    path = parts.path.strip("/")
    segs = path.split("/") if path else []
    if segs and not known_type(segs[0]):
        # absolute URL to this server: keep the Type/... tail
        while segs and not known_type(segs[0]):
            segs.pop(0)
    if not segs:
        raise _entry_error(i, BadRequest(f"request.url {url!r} names no resource type"))
    e = Entry(i, method, url, segs[0], full_url=entry.get("fullUrl"))
    if len(segs) >= 2:
        e.res_id = segs[1]
    if len(segs) == 4 and segs[2] == "_history":
        e.version = segs[3]
    e.query = parts.query or None
    e.if_none_exist = req.get("ifNoneExist")
    e.if_match = req.get("ifMatch")
    if method in ("POST", "PUT", "DELETE") and e.res_type == "AuditEvent":  # the audit trail is read-only
        raise _entry_error(i, MethodNotAllowed("AuditEvent is the server's audit trail and read-only"))
    if method in ("POST", "PUT"):
        try:
            if check_model:
                e.resource = validate_resource(entry.get("resource"), expected_type=e.res_type)
            else:
                check_envelope(entry.get("resource"), expected_type=e.res_type)
                e.resource = entry["resource"]
        except InvalidResource as exc:
            from gateway.services.fhir import invalid_error

            raise _entry_error(i, invalid_error(exc)) from None
    if method == "PUT" and e.res_id is None and e.query is None:
        raise _entry_error(i, BadRequest("PUT needs Type/id or a conditional Type?criteria url"))
    if method == "DELETE" and e.res_id is None and e.query is None:
        raise _entry_error(i, BadRequest("DELETE needs Type/id or a conditional Type?criteria url"))
    return e


@dataclass
class TransactionPlan:
    service: "FhirService"
    raw_entries: list
    entries: list[Entry] = field(default_factory=list)
    refmap: dict[str, str] = field(default_factory=dict)
    stored: list[repo.Stored] = field(default_factory=list)
    #: the requester's access (gateway.store.access): GET entries read through it, and a restricted one may
    #: not use conditional operations
    access: Any = None

    def prepare(self, *, check_models: bool = True) -> None:
        """Parse (and unless ``check_models`` is False, model-validate) every entry; assign ids (no I/O)."""
        self.entries = [parse_request(i, e, check_model=check_models) for i, e in enumerate(self.raw_entries)]
        full_urls: set[str] = set()
        for e in self.entries:  # bdl-7: fullUrl must be unique in a bundle
            if e.full_url:
                if e.full_url in full_urls:
                    raise _entry_error(e.index, BadRequest(f"fullUrl {e.full_url!r} occurs more than once (bdl-7)"))
                full_urls.add(e.full_url)
        seen: set[tuple[str, str]] = set()
        for e in self.entries:
            if e.method == "POST":
                e.res_id = new_id()
                if e.full_url:
                    self.refmap[e.full_url] = f"{e.res_type}/{e.res_id}"
            elif e.method == "PUT" and e.res_id is not None:
                if not ID_RE.match(e.res_id):
                    raise _entry_error(e.index, BadRequest(f"id {e.res_id!r} is not a valid FHIR id"))
                if e.resource.get("id") != e.res_id:
                    raise _entry_error(e.index, BadRequest(
                        f"resource.id {e.resource.get('id')!r} must equal the id in request.url ({e.res_id!r})"))
                if e.full_url:
                    self.refmap[e.full_url] = f"{e.res_type}/{e.res_id}"
            if e.method in ("PUT", "DELETE") and e.res_id is not None:
                key = (e.res_type, e.res_id)
                if key in seen:
                    raise _entry_error(e.index, BadRequest(f"{e.res_type}/{e.res_id} appears twice in the transaction"))
                seen.add(key)

    async def check_models(self, validator: "ModelValidator") -> None:
        """Model-validate every resource of the plan; the first invalid entry fails the transaction."""
        with_resource = [e for e in self.entries if e.resource is not None]
        issues = await validator.issues([e.resource for e in with_resource])
        if issues:
            first = min(issues)
            from gateway.services.fhir import invalid_error

            raise _entry_error(with_resource[first].index, invalid_error(InvalidResource(issues[first])))

    async def execute(self, conn) -> dict[str, Any]:
        svc = self.service
        conditional = [e for e in self.entries if (e.method == "POST" and e.if_none_exist)
                       or (e.method in ("PUT", "DELETE") and e.res_id is None)
                       or (e.resource is not None and _has_conditional_reference(e.resource))]
        if conditional:
            try:
                await svc.conditional_allowed(self.access, "conditional entry")
            except GatewayError as exc:
                raise _entry_error(conditional[0].index, exc) from None
        # conditional writes: their criteria locked first, all together (see repo.lock_conditions)
        await repo.lock_conditions(conn, [
            (e.res_type, e.if_none_exist) if e.method == "POST" else (e.res_type, e.query or "")
            for e in self.entries if (e.method == "POST" and e.if_none_exist)
            or (e.method in ("PUT", "DELETE") and e.res_id is None)])
        # 1. conditional creates: an existing match replaces the create (and its fullUrl maps to it)
        for e in self.entries:
            if e.method == "POST" and e.if_none_exist:
                try:
                    found = await svc._conditional_match(conn, self.access, e.res_type, e.if_none_exist, "ifNoneExist", lock=False)
                except GatewayError as exc:
                    raise _entry_error(e.index, exc) from None
                if found is not None:
                    e.stored, e.status, e.method = found, 200, "NOOP"
                    if e.full_url:
                        self.refmap[e.full_url] = f"{e.res_type}/{found.res_id}"
        # 2. conditional update/delete targets
        for e in self.entries:
            if e.method in ("PUT", "DELETE") and e.res_id is None:
                try:
                    found = await svc._conditional_match(conn, self.access, e.res_type, e.query or "", "conditional url", lock=False)
                except GatewayError as exc:
                    raise _entry_error(e.index, exc) from None
                if found is not None:
                    e.res_id = found.res_id
                elif e.method == "PUT":
                    e.res_id = e.resource.get("id") or new_id()
                else:
                    e.method, e.status = "NOOP", 204
                if e.method == "PUT":
                    e.resource = dict(e.resource, id=e.res_id)
                    if e.full_url:
                        self.refmap[e.full_url] = f"{e.res_type}/{e.res_id}"
        # 3. references: fullUrl map, then conditional references (Type?criteria)
        cond_cache: dict[str, str] = {}
        for e in self.entries:
            if e.resource is None or e.method not in ("POST", "PUT"):
                continue
            conditional: list[str] = []

            def fix(ref: str) -> str | None:
                if ref in self.refmap:
                    return self.refmap[ref]
                if "?" in ref and not ref.startswith("#"):
                    conditional.append(ref)
                if ref.startswith("urn:uuid:") or ref.startswith("urn:oid:"):
                    raise _entry_error(e.index, BadRequest(f"reference {ref!r} matches no entry fullUrl"))
                return None

            e.resource = rewrite_references(e.resource, fix)
            for ref in conditional:
                if ref not in cond_cache:
                    rtype, _, query = ref.partition("?")
                    try:
                        found = await svc._conditional_match(conn, self.access, rtype, query, "conditional reference", lock=False)
                    except GatewayError as exc:
                        raise _entry_error(e.index, exc) from None
                    if found is None:
                        raise _entry_error(e.index, NotFound(f"conditional reference {rtype}?… matches nothing",
                                                             status=412, issue_code="not-found"))
                    cond_cache[ref] = f"{rtype}/{found.res_id}"
            if conditional:
                e.resource = rewrite_references(e.resource, lambda r: cond_cache.get(r))
        # 4. writes, in spec order (the resources read-then-written locked first: see repo.lock_resources)
        await repo.lock_resources(conn, [(e.res_type, e.res_id) for e in self.entries
                                         if e.method in ("PUT", "DELETE") and e.res_id is not None])
        writes: list[tuple[Entry, repo.Write]] = []
        for method in ("DELETE", "POST", "PUT"):
            for e in self.entries:
                if e.method != method:
                    continue
                prev = None
                if method in ("PUT", "DELETE"):
                    # a research scope writes only what it may read (FhirService.current_for_write)
                    prev, hidden = await svc.current_for_write(conn, self.access, e.res_type, e.res_id)
                    if hidden and method == "DELETE":
                        await svc.hidden(self.access, Interaction.DELETE, e.res_type, e.res_id)
                        e.status = 204
                        continue
                    if hidden:
                        raise _entry_error(e.index, await svc.hidden(self.access, Interaction.UPDATE, e.res_type,
                                                                     e.res_id))
                    if e.if_match is not None:
                        from gateway.services.fhir import parse_etag

                        want = parse_etag(e.if_match)
                        if prev is None or prev.version != want:
                            raise _entry_error(e.index, PreconditionFailed(
                                f"ifMatch {e.if_match} does not match {e.res_type}/{e.res_id}"))
                if method == "DELETE":
                    if prev is None or prev.deleted:
                        e.status = 204
                        continue
                    writes.append((e, repo.Write(e.res_type, e.res_id, None, prev, "DELETE")))
                    e.status = 204
                else:
                    writes.append((e, repo.Write(e.res_type, e.res_id, e.resource, prev, method)))
                    e.status = 201 if (method == "POST" or prev is None or prev.deleted) else 200
        try:
            results = await repo.apply_writes(conn, [w for _, w in writes])
        except repo.VersionConflict:
            raise PreconditionFailed("a resource in the transaction was changed concurrently") from None
        for (e, _), st in zip(writes, results):
            e.stored = st
        self.stored = [st for st in results]
        # 5. reads, through the requester's access like a direct read
        for e in self.entries:
            if e.method == "GET":
                await _read_entry(svc, conn, e, self.access)
        return {
            "resourceType": "Bundle",
            "id": new_id(),
            "type": "transaction-response",
            "entry": [_response_entry(e) for e in self.entries],
        }


def _has_conditional_reference(resource: dict) -> bool:
    from mappings.fhir.references import iter_references

    return any("?" in r and not r.startswith("#") for r in iter_references(resource))


def searchset_resource(result) -> dict[str, Any]:
    """The searchset Bundle of a search entry (``total`` only when the search gave one: FHIR JSON has no null)."""
    out: dict[str, Any] = {"resourceType": "Bundle", "type": "searchset"}
    if result.total is not None:
        out["total"] = result.total
    if result.matches:
        out["entry"] = [{"resource": m.resource()} for m in result.matches]
    return out


async def _read_entry(svc: "FhirService", conn, e: Entry, access) -> None:
    requester = access.requester
    try:
        if e.res_id is None:
            q = svc.parse_search(e.res_type, parse_qsl(e.query or "", keep_blank_values=True))
            result = await svc.search(requester, q, access=access, conn=conn)
            e.response_resource = searchset_resource(result)
            e.status = 200
            return
        if e.version:
            st = await svc.vread(requester, e.res_type, e.res_id, e.version, access=access, conn=conn)
        else:
            st = await svc.read(requester, e.res_type, e.res_id, access=access, conn=conn)
    except GatewayError as exc:
        raise _entry_error(e.index, exc) from None
    e.stored, e.status = st, 200


def _response_entry(e: Entry) -> dict[str, Any]:
    resp: dict[str, Any] = {"status": _status(e.status)}
    out: dict[str, Any] = {}
    st = e.stored
    if st is not None:
        if not st.deleted:
            resp["location"] = f"{st.res_type}/{st.res_id}/_history/{st.version}"
            resp["etag"] = st.etag
            resp["lastModified"] = st.last_updated
            out["fullUrl"] = f"{st.res_type}/{st.res_id}"
        if e.method == "GET" and not st.deleted:
            out["resource"] = st.resource()
    if e.response_resource is not None:
        out["resource"] = e.response_resource
    out["response"] = resp
    return out


async def batch_entry_response(svc: "FhirService", requester: "Requester", i: int, raw: Any) -> dict[str, Any]:
    """One batch entry as an independent interaction (its own database transaction)."""
    try:
        e = parse_request(i, raw)
    except GatewayError:
        raise
    if e.method == "POST":
        res = await svc.create(requester, e.res_type, e.resource, e.if_none_exist)
        e.stored, e.status = res.stored, (201 if res.created else 200)
    elif e.method == "PUT":
        if e.res_id is None:
            raise _entry_error(i, BadRequest("conditional update is only supported in transactions"))
        res = await svc.update(requester, e.res_type, e.res_id, e.resource, e.if_match)
        e.stored, e.status = res.stored, (201 if res.created else 200)
    elif e.method == "DELETE":
        if e.res_id is None:
            raise _entry_error(i, BadRequest("conditional delete is only supported in transactions"))
        await svc.delete(requester, e.res_type, e.res_id)
        e.status = 204
    else:
        if e.res_id is None:
            q = svc.parse_search(e.res_type, parse_qsl(e.query or "", keep_blank_values=True))
            result = await svc.search(requester, q)
            e.response_resource = searchset_resource(result)
        elif e.version:
            e.stored = await svc.vread(requester, e.res_type, e.res_id, e.version)
        else:
            e.stored = await svc.read(requester, e.res_type, e.res_id)
        e.status = 200
    return _response_entry(e)
