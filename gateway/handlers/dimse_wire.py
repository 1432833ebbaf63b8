"""DIMSE wire-level pieces of the listener (gateway/handlers/dimse.py): status codes, peers from the settings,
the shared supported presentation contexts, C-FIND pending responses written by the handler, and the
translation of identifiers to QIDO-RS parameters and of STOW failures to C-STORE statuses."""

from __future__ import annotations

import copy
import logging
import socket
import threading
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Callable

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import build_context
from pynetdicom.dimse_messages import C_FIND_RSP
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationServer, RequestHandler

from gateway.auth import parse_purpose
from gateway.context import CLINICAL_ROLES, ROLES, Purpose, Requester
from gateway.errors import GatewayError
from gateway.services.dicomweb import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, UID_MISMATCH
from gateway.settings import Settings, SettingsError
from mappings.dicom.find_response import ResponseLayout
from mappings.dicom.qido import QidoError

log = logging.getLogger(__name__)

#: PS3.7 Annex C general statuses used besides the Storage Service's own (PS3.4 B.2.3)
NOT_AUTHORIZED = 0x0124
PROCESSING_FAILURE = 0x0110
PENDING = 0xFF00
#: C-FIND / C-MOVE failures (PS3.4 C.4.1.1.4, C.4.2.1.5)
FIND_UNABLE = 0xC000
IDENTIFIER_MISMATCH = 0xA900
#: how long an association thread waits for the event loop's answer to one service call
CALL_TIMEOUT_S = 600.0
#: C-FIND results are read from the QIDO query in pages of this many rows (QIDO-RS's largest page)
FIND_PAGE = 1000

LEVELS = {"STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}
PATIENT_KEYS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
#: identifier elements that are not keys (PS3.4 C.4.1.2.1)
NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC", "QueryRetrieveView"}
#: keys answered by the SCP itself (not from the index)
SCP_KEYS = {"RetrieveAETitle", "InstanceAvailability", "NumberOfPatientRelatedStudies",
            "NumberOfPatientRelatedSeries", "NumberOfPatientRelatedInstances"}


@dataclass(frozen=True)
class Peer:
    """A calling AE title's identity (``[dimse_peers.<AE>]``): its role, purpose, allowed source address and,
    for a C-MOVE destination, its port."""

    ae_title: str
    role: str
    purpose: Purpose = Purpose()
    host: str | None = None
    port: int | None = None
    attributes: dict = field(default_factory=dict, hash=False, compare=False)

    def requester(self) -> Requester:
        return Requester(f"dimse:{self.ae_title}", frozenset({self.role}), None, dict(self.attributes), self.purpose)


def _purpose(role: str, value: Any, where: str) -> Purpose:
    try:
        purpose = parse_purpose(value)
    except GatewayError as exc:
        raise SettingsError(f"setting '{where}.purpose': {exc}") from None
    if purpose is not None:
        return purpose
    # as for tokens without a purpose claim (gateway.auth): clinical roles act for treatment
    return Purpose() if role in CLINICAL_ROLES or role == "admin" else Purpose("research", (), ())


def peers_from(settings: Settings) -> dict[str, Peer]:
    """The ``[dimse_peers.<AE>]`` tables, checked (a wrong value names its setting)."""
    raw = settings.extra.get("dimse_peers") or {}
    if not isinstance(raw, dict):
        raise SettingsError("setting 'dimse_peers': expected tables [dimse_peers.<AE title>]")
    peers = {}
    for ae, spec in raw.items():
        where = f"dimse_peers.{ae}"
        if not (0 < len(ae) <= 16) or not isinstance(spec, dict):
            raise SettingsError(f"setting '{where}': an AE title of 1-16 characters with a table of role, purpose, ...")
        role = spec.get("role")
        if role not in ROLES:
            raise SettingsError(f"setting '{where}.role': {role!r} is not one of {', '.join(sorted(ROLES))}")
        port = spec.get("port")
        if port is not None and not (isinstance(port, int) and 0 < port < 65536):
            raise SettingsError(f"setting '{where}.port': {port!r} is not a TCP port")
        unknown = set(spec) - {"role", "purpose", "host", "port", "attributes"}
        if unknown:
            raise SettingsError(f"setting '{where}': unknown key(s) {', '.join(sorted(unknown))}")
        peers[ae] = Peer(ae, role, _purpose(role, spec.get("purpose"), where), spec.get("host") or None, port,
                         dict(spec.get("attributes") or {}))
    if settings.dimse_accept_unknown and settings.dimse_accept_unknown not in ROLES:
        raise SettingsError(f"setting 'dimse_accept_unknown': {settings.dimse_accept_unknown!r} is not a role")
    return peers


def _status(code: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]  # LO: 64 characters
    return ds


def _text(elem) -> str:
    """An identifier element's value as QIDO-RS query text (multiple values joined by backslash)."""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, (list, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)



class SupportedContext(PresentationContext):
    """A presentation context the listener supports, whose deep copy shares its UIDs (immutable ``str``s) and
    copies its lists. pynetdicom deep-copies the server's supported contexts for every association it accepts;
    the listener supports every storage SOP class with every transfer syntax (thousands of UIDs), whose
    one-by-one deep copy would be most of the CPU time of a short association (a C-ECHO or a C-FIND).
    tests/unit/test_dimse_contexts.py checks that a context holds nothing else that a shared reference
    could let one association change for another."""

    @classmethod
    def of(cls, cx: PresentationContext) -> SupportedContext:
        new = cls.__new__(cls)
        vars(new).update(copy.deepcopy(vars(cx)))
        return new

    def __deepcopy__(self, memo: dict) -> SupportedContext:
        new = copy.copy(self)
        for name, value in vars(self).items():
            if isinstance(value, list):
                vars(new)[name] = list(value)
        return new


#: Linux's TCP_QUICKACK (none elsewhere)
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)

#: PS3.8 Table 9-21 (result source, reason) of the rejections pynetdicom makes
_REJECT_REASONS = {(1, 3): "calling AE title not recognised", (1, 7): "called AE title not recognised",
                   (2, 2): "protocol version not supported", (3, 2): "too many associations (dimse_max_associations)",
                   (1, 1): "no reason given"}


class _BadIdentifier(ValueError):
    pass


class _Unencodable(Exception):
    """A C-FIND answer pydicom could not encode."""


class _Failed(Exception):
    """A service call failed unexpectedly (logged by type): the request is answered 0110."""


class _FindResponses:
    """The pending responses (0xFF00) of one C-FIND, sent by the handler: the command set, the same for every
    match, is encoded once, and each identifier straight from its QIDO-RS row (:class:`ResponseLayout`; pydicom
    for a row the layout leaves, as pynetdicom would encode it). Each message goes to the association's DUL:
    its command and data set PDVs in one P-DATA when both fit the peer's maximum PDU length, else one PDV per
    P-DATA as pynetdicom's own sends, fragments within that length."""

    def __init__(self, event, layout: ResponseLayout | None) -> None:
        req = event.request
        self.assoc = event.assoc
        self.context_id = event.context.context_id
        self.ts = UID(event.context.transfer_syntax)
        self.layout = layout
        rsp = C_FIND()
        rsp.MessageIDBeingRespondedTo = req.MessageID
        rsp.AffectedSOPClassUID = req.AffectedSOPClassUID
        rsp.Status = PENDING
        rsp.Identifier = BytesIO(b"\0")  # (marks the message as carrying a data set)
        msg = C_FIND_RSP()
        msg.primitive_to_message(rsp)
        self.command = encode(msg.command_set, True, True)
        self.fragment = (self.assoc.requestor.maximum_length or 0) - 6  # (PDV item header: 6 bytes)

    def send(self, item: dict, answer: Callable[[], Dataset]) -> bool:
        """Send the pending response for one match; ``False`` when the association is released or aborted
        (nothing more is sent)."""
        acse = self.assoc.acse
        if acse.is_aborted() or acse.is_release_requested():
            return False
        data = self.layout.encode(item) if self.layout is not None else None
        if data is None:
            data = encode(answer(), self.ts.is_implicit_VR, self.ts.is_little_endian, self.ts.is_deflated)
            if not data:
                raise _Unencodable()
        if self.fragment <= 0 or len(self.command) + len(data) + 6 <= self.fragment:
            # command and data set of the message in one P-DATA-TF: two PDVs (PS3.8 9.3.5)
            pdata = P_DATA()
            pdata.presentation_data_value_list.append((self.context_id, b"\x03" + self.command))
            pdata.presentation_data_value_list.append((self.context_id, b"\x02" + data))
            self.assoc.dul.send_pdu(pdata)
        else:
            self._put(0x03, self.command)
            self._put(0x02, data)
        return True

    def _put(self, last: int, data: bytes) -> None:
        """``data`` as PDVs: message control header ``last`` on its last fragment, ``last & 1`` before."""
        size = self.fragment if self.fragment > 0 else max(len(data), 1)
        for start in range(0, max(len(data), 1), size):
            end = start + size
            pdata = P_DATA()
            pdata.presentation_data_value_list.append(
                (self.context_id, bytes([last if end >= len(data) else last & 1]) + data[start:end]))
            self.assoc.dul.send_pdu(pdata)


class _RequestCheckedFeed:
    """The parse feed of one C-STORE, whose outcome also fails (0xA900, nothing stored) when the data set's
    SOP Class / Instance UID differ from the request's Affected SOP Class / Instance UID (PS3.4 B.2.3)."""

    def __init__(self, feed, sop_class: str, sop_uid: str) -> None:
        self.feed, self.sop_class, self.sop_uid = feed, sop_class, sop_uid
        self._syncs = feed._syncs

    async def results(self):
        outcomes, errors = await self.feed.results()
        for o in outcomes:
            if o.failure is None and (o.sop_uid != self.sop_uid or o.sop_class != self.sop_class):
                o.failure, o.reason = UID_MISMATCH, ("SOP Class/Instance UID of the data set differ from the "
                                                     "request's Affected SOP Class/Instance UID")
        return outcomes, errors


def _store_status(failure: int) -> int:
    """A STOW failure reason as a C-STORE status (PS3.4 B.2.3; PS3.7 C.5 for the general ones)."""
    if failure in (OUT_OF_RESOURCES, UID_MISMATCH, CANNOT_UNDERSTAND, PROCESSING_FAILURE):
        return failure
    if 0xA700 <= failure <= 0xA7FF or 0xA900 <= failure <= 0xA9FF or 0xC000 <= failure <= 0xCFFF:
        return failure
    return failure if failure in (0x0111, 0x0117, 0x0122, 0x0124) else PROCESSING_FAILURE


def _qido_pairs(ident: Dataset, level: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(QIDO-RS matching parameters, includefield names) for a C-FIND identifier: a key with a value is a
    matching key, an empty one a return key (PS3.4 C.2.2.1)."""
    pairs, includes = [], []
    for elem in ident:
        kw = elem.keyword
        if kw in NOT_KEYS or kw in SCP_KEYS or elem.tag.group == 0x0002:
            continue
        name = kw or f"{elem.tag:08X}"
        if elem.VR == "SQ":
            if elem.value:
                raise QidoError(name, "sequence matching is not supported")
            includes.append(name)
            continue
        value = _text(elem)
        if level == "PATIENT" and kw not in PATIENT_KEYS:
            raise QidoError(name, "is not a Patient level key")
        if value and value != "*":
            pairs.append((name, value))
        includes.append(name)
    return pairs, includes


def _patients(rows: list[dict]) -> list[dict]:
    """Patient-level answers from the gated study matches: one per (PatientID, issuer), with the number of
    its visible studies, series and instances."""
    tags = {"00100010", "00100020", "00100021", "00100030", "00100040"}
    out: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(orjson_key(r.get(t)) for t in ("00100020", "00100021"))
        p = out.get(key)
        if p is None:
            p = out[key] = {t: r[t] for t in tags if t in r}
            p["00201200"] = {"vr": "IS", "Value": [0]}
            p["00201202"] = {"vr": "IS", "Value": [0]}
            p["00201204"] = {"vr": "IS", "Value": [0]}
        p["00201200"]["Value"][0] += 1
        p["00201202"]["Value"][0] += int((r.get("00201206", {}).get("Value") or [0])[0])
        p["00201204"]["Value"][0] += int((r.get("00201208", {}).get("Value") or [0])[0])
    return list(out.values())


def orjson_key(element: dict | None) -> str:
    if not element or not element.get("Value"):
        return ""
    v = element["Value"][0]
    return v.get("Alphabetic", "") if isinstance(v, dict) else str(v)


def _store_contexts(rows: list[dict]) -> list:
    """Presentation contexts for the C-STORE sub-operations of a C-MOVE: one per SOP class and stored transfer
    syntax, so each instance is sent as stored (PS3.8 9.3.2.2: at most 128)."""
    pairs = sorted({(r["sop_class_uid"], r["transfer_syntax"]) for r in rows})
    return [build_context(cls, [ts]) for cls, ts in pairs[:128]]


class _HandedRequestHandler(RequestHandler):
    """pynetdicom's request handler for a connection the parent process accepted; ``over_limit``: the parent
    counted ``dimse_max_associations`` open already, so the association is rejected once requested
    (``DimseListener.on_requested``: A-ASSOCIATE-RJ "local limit exceeded", audited)."""

    def __init__(self, request, client_address, server, over_limit: bool = False) -> None:
        self.over_limit = over_limit
        super().__init__(request, client_address, server)

    def _create_association(self):
        assoc = self.assoc = super()._create_association()
        assoc._fedgate_over_limit = self.over_limit
        return assoc


class HandedAssociationServer(AssociationServer):
    """pynetdicom's association server for the connections the parent of ``fedgate serve --processes N``
    accepts on the DIMSE port and hands to this serving process (gateway/serve.py): no socket of its own;
    :meth:`take` starts a thread per connection that does what pynetdicom's threaded server does for a
    connection it accepted itself (the TLS handshake, then an :class:`~pynetdicom.association.Association`
    acceptor with the server's presentation contexts, limits and event handlers), then waits for the
    association's end.

    :meth:`counts` is this process's DIMSE load for the parent: connections taken over in all, and those open
    now (from the hand-over to the end of the association's thread)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("request_handler", _HandedRequestHandler)
        super().__init__(*args, **kwargs)
        self._lock = threading.Lock()
        self._taken = 0
        self._open = 0

    def server_bind(self) -> None:  # (the parent holds the listening socket)
        pass

    def server_activate(self) -> None:
        pass

    def take(self, conn: socket.socket, over_limit: bool) -> None:
        """Serve ``conn`` (blocking, accepted by the parent) as pynetdicom serves an accepted connection."""
        with self._lock:
            self._taken += 1
            self._open += 1
        threading.Thread(target=self._serve, args=(conn, over_limit), name="fedgate-dimse-accept",
                         daemon=True).start()

    def _serve(self, conn: socket.socket, over_limit: bool) -> None:
        try:
            try:
                address = conn.getpeername()
                if self.ssl_context is not None:  # (a peer that never completes its handshake: the ACSE timeout)
                    conn.settimeout(self.ae.acse_timeout)
                    conn = self.ssl_context.wrap_socket(conn, server_side=True)
                    conn.settimeout(None)
            except OSError as exc:  # gone already, or a failed TLS handshake (as pynetdicom: nothing to answer)
                log.info("DIMSE connection closed before its association", extra={"error_type": type(exc).__name__})
                conn.close()
                return
            try:
                handler = self.RequestHandlerClass(conn, address, self, over_limit)  # (starts the association)
            except Exception as exc:  # noqa: BLE001 — one connection's failure; the others go on
                log.warning("DIMSE connection failed", extra={"error_type": type(exc).__name__})
                self.shutdown_request(conn)
                return
            handler.assoc.join()
        finally:
            with self._lock:
                self._open -= 1
            self.service_actions()  # (as pynetdicom's accept loop: a full collection every 60 connections)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self._taken, self._open

    def shutdown(self) -> None:
        """No accept loop to stop: close the (unbound) socket. The associations are ended by ``AE.shutdown``."""
        self.server_close()
