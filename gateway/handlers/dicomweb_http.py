"""The HTTP side of DICOMweb shared by every route (DICOM PS3.18): the service's URLs as the client reached
it (:func:`urls`), the one Accept negotiator (:class:`Accept`, PS3.18 §8.7: media types and transfer
syntaxes) and the one multipart/related writer (:class:`MultipartWriter`, PS3.18 §8.7.3.2 / RFC 2387)."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from aiohttp import web

from gateway import keys
from gateway.edge import FORWARDED, PREFIX
from gateway.errors import BadRequest, NotAcceptable
from mappings.dicom import negotiate
from mappings.dicom import pixels
from mappings.dicom.urls import DicomwebUrls

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
UNCOMPRESSED = set(pixels.UNCOMPRESSED)  # explicit/implicit VR little endian, big endian, deflate
_ANY_DICOM = (negotiate.DICOM, "application/*", "*/*")


def urls(request: web.Request) -> DicomwebUrls:
    """The DICOMweb URLs of this gateway as the client addresses it: the configured ``base_url``, else the
    request's scheme, host and path prefix (already taken from Forwarded / X-Forwarded-* by the edge
    middleware when the proxy is trusted)."""
    configured = request.app[keys.SETTINGS].base_url
    if configured:
        return DicomwebUrls(configured.rstrip("/") + "/dicomweb")
    host = request.host
    if ":" not in host.rsplit("]", 1)[-1] and request.transport is not None and not request.get(FORWARDED):
        # some clients (dicomweb-client) send Host without the port: use the port we were reached on
        sock = request.transport.get_extra_info("sockname")
        if sock and sock[1] not in (80, 443):
            host = f"{host}:{sock[1]}"
    return DicomwebUrls(f"{request.scheme}://{host}{request.get(PREFIX, '')}/dicomweb")


def media_with_ts(media: str, ts: str | None) -> str:
    return f"{media}; transfer-syntax={ts}" if ts else media


@dataclass(frozen=True)
class Accept:
    """A request's Accept header and what each kind of DICOMweb answer may be sent as (406 when nothing
    acceptable can be produced, 400 for a malformed header)."""

    header: str | None

    @classmethod
    def of(cls, request: web.Request) -> "Accept":
        return cls(request.headers.get("Accept"))

    def wants(self, default_part: str) -> list[negotiate.Want]:
        """The acceptable representations, best first (:func:`mappings.dicom.negotiate.parse_accept`)."""
        try:
            return negotiate.parse_accept(self.header, default_part)
        except negotiate.AcceptError as exc:
            raise BadRequest(str(exc)) from None

    def json(self) -> None:
        """QIDO-RS and metadata answers are application/dicom+json only."""
        accept = self.header or ""
        if not accept:
            return
        for item in accept.split(","):
            media = item.split(";")[0].strip().lower()
            if media in (DICOM_JSON, "application/json", "*/*", "application/*"):
                return
        raise NotAcceptable(f"Accept {accept!r}: this server answers application/dicom+json")

    def instances(self, wants: list[negotiate.Want], rows: list[dict]) -> tuple[negotiate.Want, list[str | None]]:
        """Instances (PS3.18 §8.7.3.5): the first accepted application/dicom want and, per instance, None =
        send as stored, else the transfer syntax to transcode to — the first accepted representation that
        can be produced (uncompressed, RLE or JPEG 2000 lossless; compressed instances are decoded first).
        406 if an instance has none. ``wants``: :meth:`wants` of application/dicom (parsed before the
        instances are looked up: a malformed header is a 400 first)."""
        dicom = [w for w in wants if w.media in _ANY_DICOM]
        if not dicom:
            accept = wants[0].media if wants else ""
            raise NotAcceptable(f"Accept {accept!r}: instances are sent as multipart/related; type=\"application/dicom\"")
        plan: list[str | None] = []
        for r in rows:
            stored = r["transfer_syntax"]
            for w in dicom:
                ts = w.ts or EXPLICIT_LE
                if ts == "*" or ts == stored:
                    plan.append(None)
                    break
                if (ts in UNCOMPRESSED or ts in pixels.ENCODABLE) and pixels.can_decode(stored):
                    plan.append(ts)
                    break
            else:
                raise NotAcceptable(f"instance {r['sop_uid']} is stored as {stored}; it cannot be sent in an "
                                    "accepted transfer syntax (ask for transfer-syntax=* to get it as stored)")
        return dicom[0], plan

    @staticmethod
    def instances_as_stored(wants: list[negotiate.Want]) -> negotiate.Want:
        """Instances that can only be sent in their stored transfer syntax (de-identified answers)."""
        for want in wants:
            if want.media in _ANY_DICOM and want.ts in (None, "*"):
                return want
        raise NotAcceptable("de-identified instances are sent in their stored transfer syntax: ask for "
                            "application/dicom (transfer-syntax=*)")

    def frames(self) -> list[negotiate.Want]:
        """Frames (PS3.18 §8.7.3.5, Table 8.7.3-5): the wants, for :func:`pixels.frames_as` to pick from."""
        return self.wants(negotiate.OCTET)

    def bulkdata(self) -> negotiate.Want:
        """Bulk data is sent as stored: application/octet-stream, multipart or single part."""
        for want in self.wants(negotiate.OCTET):
            if want.media in (negotiate.OCTET, "*/*", "application/*") and want.ts in (None, "*", EXPLICIT_LE):
                return want
        raise NotAcceptable(f"Accept {self.header!r}: bulk data is sent as application/octet-stream "
                            "(single part, or multipart/related; type=\"application/octet-stream\")")

    def rendered(self) -> str:
        """Rendered images (PS3.18 §8.3.5): image/jpeg (the default) or image/png."""
        accept = self.header if self.header is not None else "image/jpeg"
        for item in accept.split(","):
            media = item.split(";")[0].strip().lower()
            if media in ("image/jpeg", "image/png"):
                return media
            if media in ("*/*", "image/*"):
                return "image/jpeg"
        raise NotAcceptable(f"Accept {accept!r}: rendered images are image/jpeg or image/png")


class MultipartWriter:
    """A multipart/related response (RFC 2387) of parts of one ``part_type``, streamed: :meth:`start`, then
    :meth:`part` (or :meth:`head` / :attr:`tail` for callers that send the bodies themselves), :meth:`end`.
    Once started, a failure can only cut the connection (:meth:`cut_short`), never change the status."""

    def __init__(self, request: web.Request, part_type: str) -> None:
        self.request = request
        self.boundary = secrets.token_hex(16)
        self.response = web.StreamResponse(headers={
            "Content-Type": f'multipart/related; type="{part_type}"; boundary={self.boundary}'})
        self.tail = f"--{self.boundary}--\r\n".encode()

    def head(self, content_type: str) -> bytes:
        """A part's delimiter and headers."""
        return f"--{self.boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode()

    async def start(self, content_length: int | None = None) -> None:
        if content_length is not None:
            self.response.content_length = content_length
        await self.response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        await self.response.write(data)

    async def part(self, content_type: str, body: bytes) -> None:
        await self.response.write(self.head(content_type))
        await self.response.write(body)
        await self.response.write(b"\r\n")

    async def end(self) -> web.StreamResponse:
        await self.response.write(self.tail)
        await self.response.write_eof()
        return self.response

    def cut_short(self, exc: BaseException) -> web.StreamResponse:
        """A multipart answer that failed after its status line went out: the connection is closed (the
        client sees a truncated body, never an error status inside a 200)."""
        log.warning("WADO response cut short", extra={"error_type": type(exc).__name__})
        self.response.force_close()
        if self.request.transport is not None:
            self.request.transport.close()
        return self.response


async def send_parts(request: web.Request, media: str, ts: str | None, blobs: list[bytes],
                     multipart: bool) -> web.StreamResponse:
    """Values of one media type: single part (PS3.18 §8.7.3.2: the one frame / value is the body) or
    multipart/related."""
    if not multipart:
        [blob] = blobs
        return web.Response(body=blob, headers={"Content-Type": media_with_ts(media, ts)})
    out = MultipartWriter(request, media)
    await out.start()
    for blob in blobs:
        await out.part(media_with_ts(media, ts), blob)
    return await out.end()


__all__ = ["Accept", "DICOM_JSON", "MultipartWriter", "media_with_ts", "send_parts", "urls"]
