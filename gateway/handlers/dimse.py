"""DIMSE (DICOM PS3.7 / PS3.4) for PACS and modalities that do not speak DICOMweb: C-ECHO, C-STORE, C-FIND,
C-MOVE and C-GET SCP, on ``pynetdicom``.

Protocol translation only, like the HTTP handlers: each DIMSE request is turned into a call of the one
:class:`~gateway.services.dicomweb.DicomwebService` the composition root built — C-STORE goes through
``store`` (the STOW-RS ingest: same checks, duplicate rules, crash safety, ImagingStudy sync, audit), C-FIND
through ``search`` with a :class:`~mappings.dicom.qido.QidoQuery` made from the identifier (QIDO-RS matching
and consent gate), C-MOVE/C-GET through ``instances`` (the WADO-RS retrieval, gated and audited).

pynetdicom's association server is blocking and runs its associations in threads; every service call is
handed to the aiohttp process's event loop with :func:`asyncio.run_coroutine_threadsafe`, so the services
(their database pools, caches and the audit chain) are the same objects that serve HTTP.

Who is calling: the calling AE title (and optionally its address) maps to a fedgate role and purpose through
``[dimse_peers.<AE>]`` (docs/dimse.md); an unknown AE title is rejected at association time (PS3.8 A-ASSOCIATE-RJ,
"calling AE title not recognised") unless ``dimse_accept_unknown`` names a role. Every refusal is audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Iterator

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import _config
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (PatientRootQueryRetrieveInformationModelFind,
                                  PatientRootQueryRetrieveInformationModelMove,
                                  StudyRootQueryRetrieveInformationModelFind,
                                  StudyRootQueryRetrieveInformationModelGet,
                                  StudyRootQueryRetrieveInformationModelMove, Verification)

from gateway.context import Requester
from gateway.errors import GatewayError
from gateway.services.access import AccessRecord
from gateway.services.audit_codes import Action, Interaction, Outcome as AuditOutcome
from gateway.services.dicomweb import (CANNOT_UNDERSTAND, OUT_OF_RESOURCES, WARNING_IDENTICAL,
                                       DicomwebService, Outcome, Part, Retrieval)
from gateway.handlers.dimse_wire import (CALL_TIMEOUT_S, FIND_PAGE, FIND_UNABLE, IDENTIFIER_MISMATCH, LEVELS,
                                         NOT_AUTHORIZED, PENDING, HandedAssociationServer,
                                         PROCESSING_FAILURE, Peer, SupportedContext, _BadIdentifier, _Failed,
                                         _FindResponses, _QUICKACK, _REJECT_REASONS, _RequestCheckedFeed,
                                         _Unencodable, _patients, _purpose, _qido_pairs, _status,
                                         _store_contexts, _store_status, _text, peers_from)
from gateway.settings import Settings, SettingsError
from mappings.dicom.find_response import ResponseLayout
from mappings.dicom.qido import QidoError, QidoQuery

log = logging.getLogger(__name__)

class DimseListener:
    """The association server and its event handlers (one per serving process that listens)."""

    def __init__(self, settings: Settings, svc: DicomwebService, audit, loop: asyncio.AbstractEventLoop) -> None:
        # pynetdicom logs identifiers and data set dumps (PHI) at INFO/DEBUG, as interpolated text: keep its
        # logger to warnings and errors, and no identifiers in them (gateway/logs.py prints foreign templates)
        _config.LOG_REQUEST_IDENTIFIERS = _config.LOG_RESPONSE_IDENTIFIERS = False
        logging.getLogger("pynetdicom").setLevel(max(logging.WARNING, logging.getLogger().level))
        self.settings = settings
        self.svc = svc
        self.audit = audit
        self.loop = loop
        self.peers = peers_from(settings)
        self.server = None
        self.ae = self._build_ae()

    # ------------------------------------------------------------------------------------- set-up
    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.dimse_ae_title)
        ae.maximum_associations = s.dimse_max_associations
        ae.maximum_pdu_size = s.dimse_max_pdu
        ae.acse_timeout = s.dimse_acse_timeout_s
        ae.dimse_timeout = s.dimse_dimse_timeout_s
        ae.network_timeout = s.dimse_network_timeout_s
        ae.require_called_aet = True  # A-ASSOCIATE-RJ "called AE title not recognised" for another AE title
        if not s.dimse_accept_unknown:  # A-ASSOCIATE-RJ "calling AE title not recognised" (PS3.8 9.3.4)
            ae.require_calling_aet = sorted(self.peers)
        ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            # the requestor as SCU (C-STORE to fedgate) or as SCP (the C-STORE sub-operations of a C-GET)
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        for sop in (PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
                    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
                    StudyRootQueryRetrieveInformationModelGet):
            ae.add_supported_context(sop)
        return ae

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not (s.dimse_tls_cert or s.dimse_tls_key):
            return None
        if not (s.dimse_tls_cert and s.dimse_tls_key):
            raise SettingsError("settings 'dimse_tls_cert' and 'dimse_tls_key': give both (or neither)")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(s.dimse_tls_cert, s.dimse_tls_key)
        if s.dimse_tls_ca:
            ctx.load_verify_locations(s.dimse_tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def start(self, handed: bool = False) -> None:
        """Listen on ``dimse_port``; ``handed``: in a serving process of ``fedgate serve --processes N``, whose
        parent listens and hands each connection over (:meth:`take`), the associations of every process
        together within ``dimse_max_associations`` (docs/dimse.md)."""
        handlers = [(evt.EVT_CONN_OPEN, self.on_connected), (evt.EVT_PDU_SENT, self.on_sent),
                    (evt.EVT_REQUESTED, self.on_requested), (evt.EVT_REJECTED, self.on_rejected),
                    (evt.EVT_C_ECHO, self.on_echo), (evt.EVT_C_STORE, self.on_store),
                    (evt.EVT_C_FIND, self.on_find), (evt.EVT_C_MOVE, self.on_move), (evt.EVT_C_GET, self.on_get)]
        address = (self.settings.dimse_host or self.settings.host, self.settings.dimse_port)
        contexts = [SupportedContext.of(cx) for cx in self.ae.supported_contexts]
        if handed:
            self.server = self.ae.make_server(address, evt_handlers=handlers, ssl_context=self._ssl_context(),
                                              contexts=contexts, server_class=HandedAssociationServer)
            return
        self.server = self.ae.start_server(address, block=False, evt_handlers=handlers,
                                           ssl_context=self._ssl_context(), contexts=contexts)
        log.info("DIMSE listener ready", extra={"port": self.server.server_address[1]})

    def take(self, conn: socket.socket, over_limit: bool) -> None:
        """Serve a connection the parent process accepted on the DIMSE port (``handed`` mode); ``over_limit``:
        the gateway has ``dimse_max_associations`` open already (the association is rejected)."""
        server = self.server
        if not isinstance(server, HandedAssociationServer):
            conn.close()
            return
        server.take(conn, over_limit)

    def counts(self) -> tuple[int, int]:
        """(connections taken over in all, open now) of ``handed`` mode, for the parent's balance and limit."""
        server = self.server
        return server.counts() if isinstance(server, HandedAssociationServer) else (0, 0)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.ae.shutdown()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    # ------------------------------------------------------------------------------------- helpers
    def _call(self, coro):
        """Run a coroutine on the gateway's event loop from an association thread; its result. An unexpected
        error is logged here by type (never its message: it may quote values) and raised as
        :class:`_Failed`, which each handler answers with 0110 (processing failure)."""
        try:
            return self._call_raw(coro)
        except (GatewayError, QidoError, _BadIdentifier):
            raise
        except Exception as exc:  # noqa: BLE001 — this is DIMSE's error boundary (as the HTTP error middleware)
            log.error("DIMSE request failed", extra={"error_type": type(exc).__name__})
            raise _Failed() from None

    def _call_raw(self, coro):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(CALL_TIMEOUT_S)
        except FutureTimeout:
            fut.cancel()
            raise

    @staticmethod
    def _calling(assoc) -> str:
        prim = assoc.requestor.primitive
        return str((prim.calling_ae_title if prim is not None else None) or assoc.requestor.ae_title).strip()

    def _peer_of(self, assoc) -> Peer | None:
        ae = self._calling(assoc)
        peer = self.peers.get(ae)
        if peer is None and self.settings.dimse_accept_unknown:
            role = self.settings.dimse_accept_unknown
            peer = Peer(ae, role, _purpose(role, None, "dimse_accept_unknown"))
        return peer

    def _requester(self, event) -> Requester:
        peer = self._peer_of(event.assoc)
        if peer is None:  # (rejected at association time: never reached)
            raise GatewayError("unknown calling AE title")
        return peer.requester()

    def _audit_refusal(self, requester: Requester, interaction: str, reason: str) -> None:
        record = AccessRecord(requester, Action.EXECUTE, interaction, AuditOutcome.MINOR_FAILURE, (), (), "", reason)
        try:
            self._call(self.audit.record(record))
        except _Failed:  # (logged by type) the refusal stands
            pass

    # ------------------------------------------------------------------------------------- association
    @staticmethod
    def on_connected(event) -> None:
        """Each response goes out as it is written (TCP_NODELAY): a C-FIND answer is
        several PDUs, and Nagle's algorithm would hold each one until the peer's delayed ACK (bench/RESULTS.md)."""
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    @staticmethod
    def on_sent(event) -> None:
        """After each PDU sent, the peer's next segment is acknowledged at once (TCP_QUICKACK, which the kernel
        drops again once a reply follows a request quickly): a peer that leaves Nagle's algorithm on (DCMTK's
        tools do) writes a PDU's header and body separately and holds the body until the header is
        acknowledged, which a delayed ACK would put off (bench/RESULTS.md)."""
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if sock is not None and _QUICKACK is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)

    def on_requested(self, event) -> None:
        """A-ASSOCIATE-RQ (PS3.8 7.1): one over the gateway's ``dimse_max_associations`` (counted by the parent
        across the serving processes) and a configured calling AE title from another address than its ``host``
        are refused (AE titles that are not configured are rejected by pynetdicom's ``require_calling_aet``)."""
        assoc = event.assoc
        if getattr(assoc, "_fedgate_over_limit", False):  # (the parent's count of all serving processes)
            # rejected-transient, service-provider, local limit exceeded
            self._reject(assoc, _REJECT_REASONS[(3, 2)], 0x02, 0x03, 0x02)
            return
        peer = self._peer_of(assoc)
        if peer is not None and peer.host and assoc.requestor.address != peer.host:
            # rejected-permanent, service-user, calling AE title not recognised
            self._reject(assoc, "calling AE title from an address not configured for it", 0x01, 0x01, 0x03)

    @staticmethod
    def _reject(assoc, reason: str, result: int, source: int, diagnostic: int) -> None:
        """A-ASSOCIATE-RJ, as pynetdicom rejects: the rejection (audited by :meth:`on_rejected`), then the
        association ends once the DUL has sent it (else the connection could close before it leaves)."""
        assoc._fedgate_refusal = reason
        assoc.acse.send_reject(result, source, diagnostic)
        evt.trigger(assoc, evt.EVT_REJECTED, {})
        assoc.kill()

    def on_rejected(self, event) -> None:
        assoc = event.assoc
        reason = getattr(assoc, "_fedgate_refusal", None)
        if reason is None:
            prim = assoc.acceptor.primitive
            reason = _REJECT_REASONS.get((prim.result_source, prim.diagnostic),
                                         f"association rejected (source {prim.result_source}, reason {prim.diagnostic})")
        log.warning("DIMSE association rejected", extra={"error_type": reason})
        self._audit_refusal(Requester(f"dimse:{self._calling(assoc)}"), Interaction.DIMSE_ASSOCIATION, reason)

    # ------------------------------------------------------------------------------------- C-ECHO
    def on_echo(self, event) -> int:
        return 0x0000

    # ------------------------------------------------------------------------------------- C-STORE
    def on_store(self, event) -> Dataset:
        """C-STORE (PS3.4 B.2): the received data set, as sent, becomes one STOW-RS part; 0000 is answered only
        once it is stored and indexed (the STOW commit), B000 for an identical copy already stored."""
        requester = self._requester(event)
        req = event.request
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:  # noqa: BLE001 — a context or meta the encoder refuses: the data set cannot be kept
            return _status(CANNOT_UNDERSTAND, "the data set could not be encoded as a PS3.10 file")
        tmp = self.svc.blobs.temp_path()
        try:
            with open(tmp, "wb") as f:
                f.write(data)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            return _status(OUT_OF_RESOURCES, f"the instance could not be written: {exc.strerror or exc}")
        del data
        part = Part(tmp, tmp.stat().st_size)
        try:
            code, comment = self._call(self._store(requester, part, str(req.AffectedSOPClassUID),
                                                   str(req.AffectedSOPInstanceUID)))
        except _Failed:
            tmp.unlink(missing_ok=True)
            return _status(PROCESSING_FAILURE, "processing failure (see the gateway log)")
        return _status(code, comment)

    async def _store(self, requester: Requester, part: Part, sop_class: str, sop_uid: str) -> tuple[int, str]:
        outcomes: list[Outcome] = []
        try:
            feed = self.svc.parse_feed(None)
            feed.add(part)
            await self.svc.store(requester, [part], None, "", feed=_RequestCheckedFeed(feed, sop_class, sop_uid),
                                 outcomes_out=outcomes)
        except GatewayError as exc:  # refused (role): nothing stored
            part.tmp.unlink(missing_ok=True)
            await self.audit.record(AccessRecord(requester, Action.CREATE, Interaction.STOW,
                                                 AuditOutcome.MINOR_FAILURE, (), (), "", str(exc)))
            return NOT_AUTHORIZED, str(exc)
        (o,) = outcomes
        if o.failure is None:
            return (WARNING_IDENTICAL if o.warning == WARNING_IDENTICAL else 0x0000), ""
        return _store_status(o.failure), o.reason

    # ------------------------------------------------------------------------------------- C-FIND
    def on_find(self, event) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND (PS3.4 C.4.1): the identifier becomes a QIDO-RS query of the same level (the same matching
        and the same consent gate); Patient level groups the gated study matches by patient. The pending
        responses are sent here (:class:`_FindResponses`); the final status is yielded to pynetdicom."""
        requester = self._requester(event)
        ident = event.identifier
        level = str(ident.get("QueryRetrieveLevel", "")).upper()
        if level != "PATIENT" and level not in LEVELS:
            yield IDENTIFIER_MISMATCH, _status(IDENTIFIER_MISMATCH, f"QueryRetrieveLevel {level!r}")
            return
        try:
            pairs, includes = _qido_pairs(ident, level)
        except QidoError as exc:
            yield FIND_UNABLE, _status(FIND_UNABLE, str(exc))
            return
        out = _FindResponses(event, self._layout(ident, level, event.context.transfer_syntax))
        if level == "PATIENT":
            try:
                rows = self._call(self._find_all(requester, "studies", pairs, includes))
            except QidoError as exc:
                yield FIND_UNABLE, _status(FIND_UNABLE, str(exc))
                return
            except _Failed:
                yield PROCESSING_FAILURE, _status(PROCESSING_FAILURE, "processing failure")
                return
            yield from self._send_matches(event, out, ident, level, _patients(rows))
            return
        offset = 0
        while True:
            try:
                page, total = self._call(self._find_page(requester, LEVELS[level], pairs, includes, offset))
            except QidoError as exc:
                yield FIND_UNABLE, _status(FIND_UNABLE, str(exc))
                return
            except _Failed:
                yield PROCESSING_FAILURE, _status(PROCESSING_FAILURE, "processing failure")
                return
            if not (yield from self._send_matches(event, out, ident, level, page)):
                return
            offset += len(page)
            if not page or offset >= total:
                return

    def _send_matches(self, event, out: _FindResponses, ident: Dataset, level: str, items: list[dict]):
        """Send a pending response per match; yields a status only when the find ends early (C-CANCEL, an
        answer that cannot be encoded); ``False`` when it ended (or the association did)."""
        for item in items:
            if event.is_cancelled:
                yield 0xFE00, None
                return False
            try:
                if not out.send(item, lambda item=item: self._answer(ident, item, level)):
                    return False
            except _Unencodable:
                yield 0xC312, None  # unable to process: the answer could not be encoded
                return False
        return True

    def _layout(self, ident: Dataset, level: str, transfer_syntax) -> ResponseLayout | None:
        """How :meth:`_answer`'s identifier is written straight from a QIDO-RS row (little-endian transfer
        syntaxes; ``None``: every answer goes through pydicom)."""
        ts = UID(transfer_syntax)
        if not ts.is_little_endian or ts.is_deflated:
            return None
        keys = [(int(elem.tag), elem.VR) for elem in ident if elem.keyword != "SpecificCharacterSet"]
        return ResponseLayout(keys, {0x00080052: ("CS", level), 0x00080054: ("AE", self.settings.dimse_ae_title),
                                     0x00080056: ("CS", "ONLINE")}, implicit=ts.is_implicit_VR)

    async def _find_page(self, requester, qido_level, pairs, includes, offset):
        q = QidoQuery.parse(qido_level, pairs + [("includefield", ",".join(includes))] if includes else pairs,
                            base="", default_limit=FIND_PAGE)
        q.offset = offset
        return await self.svc.search(requester, qido_level, q)

    async def _find_all(self, requester, qido_level, pairs, includes) -> list[dict]:
        rows, offset = [], 0
        while True:
            page, total = await self._find_page(requester, qido_level, pairs, includes, offset)
            rows += page
            offset += len(page)
            if not page or offset >= total:
                return rows

    def _answer(self, ident: Dataset, item: dict, level: str) -> Dataset:
        """The response identifier: every key of the request, with the matched value or empty."""
        found = Dataset.from_json({k: v for k, v in item.items() if "BulkDataURI" not in v})
        out = Dataset()
        out.SpecificCharacterSet = "ISO_IR 192"
        for elem in ident:
            if elem.keyword in ("SpecificCharacterSet",):
                continue
            if elem.keyword == "QueryRetrieveLevel":
                out.QueryRetrieveLevel = level
            elif elem.keyword == "RetrieveAETitle":
                out.RetrieveAETitle = self.settings.dimse_ae_title
            elif elem.keyword == "InstanceAvailability":
                out.InstanceAvailability = "ONLINE"
            elif elem.tag in found:
                out.add(found[elem.tag])
            else:
                out.add_new(elem.tag, elem.VR, None if elem.VR != "SQ" else [])
        return out

    # ------------------------------------------------------------------------------------- C-MOVE / C-GET
    def on_move(self, event):
        """C-MOVE (PS3.4 C.4.2): the visible instances the identifier names are sent by C-STORE to the
        configured destination AE (``[dimse_peers.<AE>]`` with host and port)."""
        requester = self._requester(event)
        dest = self.peers.get(str(event.move_destination).strip())
        if dest is None or not dest.host or not dest.port:
            self._audit_refusal(requester, Interaction.WADO, "C-MOVE destination not configured")
            yield None, None  # 0xA801: move destination unknown
            return
        try:
            rows = self._call(self._retrieve(requester, event.identifier))
        except (QidoError, _BadIdentifier, _Failed) as exc:
            code = PROCESSING_FAILURE if isinstance(exc, _Failed) else IDENTIFIER_MISMATCH
            yield dest.host, dest.port
            yield 1
            yield code, _status(code, str(exc) or "processing failure")
            return
        contexts = _store_contexts(rows)
        yield dest.host, dest.port, {"contexts": contexts}
        yield len(rows)
        for row in rows:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield PENDING, rows.dataset(row)  # (pynetdicom sends a Dataset, re-encoded as read)

    def on_get(self, event):
        """C-GET (PS3.4 C.4.3): the visible instances, sent by C-STORE over the same association."""
        requester = self._requester(event)
        try:
            rows = self._call(self._retrieve(requester, event.identifier))
        except (QidoError, _BadIdentifier, _Failed) as exc:
            code = PROCESSING_FAILURE if isinstance(exc, _Failed) else IDENTIFIER_MISMATCH
            yield 1
            yield code, _status(code, str(exc) or "processing failure")
            return
        yield len(rows)
        for row in rows:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield PENDING, rows.dataset(row)  # (pynetdicom sends a Dataset, re-encoded as read)

    async def _retrieve(self, requester: Requester, ident: Dataset) -> Retrieval:
        """The instances a retrieve identifier names that ``requester`` may read, through the WADO-RS
        look-up (gated, audited); one that is refused looks like one that does not exist."""
        level = str(ident.get("QueryRetrieveLevel", "")).upper()
        uids = {kw: {u for u in _text(ident[kw]).split("\\") if u} if kw in ident else set()
                for kw in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        need = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
                "IMAGE": "SOPInstanceUID"}.get(level)
        if need is None:
            raise _BadIdentifier(f"QueryRetrieveLevel {level!r}")
        if not uids[need]:
            raise _BadIdentifier(f"{need} is required at the {level} level")
        studies = uids["StudyInstanceUID"]
        if not studies:  # find the studies through the gated QIDO search, as C-FIND would
            qido_level = {"PATIENT": "studies", "SERIES": "series", "IMAGE": "instances"}[level]
            pairs = [(need, "\\".join(sorted(uids[need])))]
            rows = await self._find_rows(requester, qido_level, pairs)
            studies = {r["0020000D"]["Value"][0] for r in rows if r.get("0020000D", {}).get("Value")}
        found = await self.svc.retrieve_studies(requester, studies)
        return found.only([r for r in found if (not uids["SeriesInstanceUID"] or r["series_uid"] in uids["SeriesInstanceUID"])
                           and (not uids["SOPInstanceUID"] or r["sop_uid"] in uids["SOPInstanceUID"])])

    async def _find_rows(self, requester, qido_level, pairs) -> list[dict]:
        return await self._find_all(requester, qido_level, pairs, [])


__all__ = ["DimseListener", "Peer", "SupportedContext", "peers_from"]
