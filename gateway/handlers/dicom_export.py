"""Imaging cohort export wiring (issue #24): the :class:`~gateway.services.dicom_export.DicomExportService`
built on the DICOMweb service (so every read goes through its consent-gated WADO path). Driven by
``fedgate export dicom`` (gateway/export_dicom_cli.py); no HTTP route yet (docs/deidentification.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway import keys
from gateway.handlers.dicomweb import SERVICE as DICOMWEB
from gateway.services.dicom_export import DicomExportService

EXPORT = "dicom-export"


async def _ctx(app: web.Application) -> AsyncIterator[None]:
    from gateway.app import DEID

    services = app[keys.SERVICES]
    services[EXPORT] = DicomExportService(services[DICOMWEB], services[DEID], app[keys.AUDIT])
    yield


def setup_routes(app: web.Application) -> None:
    app.cleanup_ctx.append(_ctx)  # after the DICOMweb service's context


__all__ = ["EXPORT", "setup_routes"]
