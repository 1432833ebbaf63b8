"""DICOMweb service (DICOM PS3.18): the one object the composition root builds for STOW-RS, QIDO-RS and
WADO-RS (and DIMSE, the imaging export and inference, which use the same calls).

It joins two flows that share nothing but the blob store:

- ingest — :mod:`gateway.services.dicom_ingest` (receiving side of STOW: parse feed, file commit, group
  commit; parsing in :mod:`gateway.services.dicom_parse`; SQL in :mod:`gateway.store.dicom_index`);
- query / retrieve — :mod:`gateway.services.dicom_retrieve` (QIDO search, the WADO instance look-up
  returning a :class:`~gateway.services.dicom_retrieve.Retrieval`; SQL in :mod:`gateway.store.dicom_reads`,
  built from the requester's :class:`~gateway.store.access.Access`).
"""

from __future__ import annotations

from pathlib import Path

from gateway.context import Requester
from gateway.services.access import AuditSink
from gateway.services.dicom_ingest import DicomIngest, ParseFeed
from gateway.services.dicom_parse import (CANNOT_UNDERSTAND, DUPLICATE_SOP, OUT_OF_RESOURCES, PROCESSING_FAILURE,
                                          UID_MISMATCH, WARNING_IDENTICAL, ImportResult, Outcome, Part,
                                          check_study_uid)
from gateway.services.dicom_retrieve import DicomRetrieve, Retrieval
from gateway.services.workers import WorkerPool
from gateway.store.access import AccessLayer
from gateway.store.blobs import BlobStore
from gateway.store.db import Database
from mappings.dicom.qido import QidoQuery
from mappings.dicom.urls import DicomwebUrls


class DicomwebService:
    """STOW-RS (:attr:`ingest`) and QIDO-RS / WADO-RS (:attr:`query`) over one blob store."""

    def __init__(self, db: Database, access: AccessLayer, audit: AuditSink, blobs: BlobStore,
                 workers: WorkerPool | None = None) -> None:
        self.blobs = blobs
        self.ingest = DicomIngest(db, audit, blobs, workers)
        self.query = DicomRetrieve(access, blobs)

    @property
    def workers(self) -> WorkerPool:
        return self.ingest.workers

    @property
    def metrics_observer(self):
        return self.ingest.metrics_observer

    @metrics_observer.setter
    def metrics_observer(self, observer) -> None:
        self.ingest.metrics_observer = observer

    # ---------------------------------------------------------------------------------- STOW-RS
    def parse_feed(self, study_in_path: str | None) -> ParseFeed:
        return self.ingest.parse_feed(study_in_path)

    async def store(self, requester: Requester, parts: list[Part], study_in_path: str | None,
                    retrieve_base: DicomwebUrls | str, feed: ParseFeed | None = None,
                    outcomes_out: list | None = None) -> tuple[int, dict]:
        """See :meth:`DicomIngest.store`: (HTTP status, DICOM JSON response dataset) per PS3.18 §10.5.3."""
        return await self.ingest.store(requester, parts, study_in_path, retrieve_base, feed, outcomes_out)

    async def bulk_import(self, requester: Requester, files: list[Path]) -> list[ImportResult]:
        return await self.ingest.bulk_import(requester, files)

    async def reconcile(self) -> None:
        await self.ingest.reconcile()

    async def adopt_dead_journals(self) -> None:
        await self.ingest.adopt_dead_journals()

    async def close(self) -> None:
        await self.ingest.close()

    # ---------------------------------------------------------------------------------- QIDO-RS / WADO-RS
    async def search(self, requester: Requester, level: str, q: QidoQuery, warnings: list[str] | None = None,
                     patients: list | None = None, *, releasable_only: bool = False) -> tuple[list[dict], int]:
        return await self.query.search(requester, level, q, warnings, patients, releasable_only=releasable_only)

    async def stored_study_uids(self) -> list[str]:
        """Every stored Study Instance UID (the de-identified UID index; answers nothing by itself)."""
        return await self.query.stored_study_uids()

    async def retrieve(self, requester: Requester, study: str, series: str | None = None,
                       sop: str | None = None, *, metadata: bool = True) -> Retrieval:
        """The visible instances of a study / series / instance and their stored bytes (404 when none)."""
        return await self.query.retrieve(requester, study, series, sop, metadata=metadata)

    async def retrieve_studies(self, requester: Requester, studies, *, metadata: bool = False) -> Retrieval:
        """The visible instances of several studies (C-MOVE / C-GET); a study with none visible is left out."""
        return await self.query.retrieve_studies(requester, studies, metadata=metadata)

    async def instances(self, requester: Requester, study: str, series: str | None = None,
                        sop: str | None = None, *, metadata: bool = True) -> list[dict]:
        """The index rows of :meth:`retrieve` only."""
        return (await self.retrieve(requester, study, series, sop, metadata=metadata)).rows

    def blob_path(self, row: dict) -> Path:
        """The stored file of an index row a gated look-up returned (for in-process readers such as
        inference; HTTP and DIMSE answers read through :class:`Retrieval`)."""
        return self.blobs.path(row["blob_path"])


__all__ = ["CANNOT_UNDERSTAND", "DUPLICATE_SOP", "OUT_OF_RESOURCES", "PROCESSING_FAILURE", "UID_MISMATCH",
           "WARNING_IDENTICAL", "DicomwebService", "ImportResult", "Outcome", "Part", "Retrieval",
           "check_study_uid"]
