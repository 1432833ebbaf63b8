"""DICOMweb resource URLs (DICOM PS3.18 §10.4, §10.6; Table 10.4.1-1): one builder for every URL the
gateway hands out — RetrieveURL (0008,1190) in STOW and QIDO answers, BulkDataURI in WADO metadata,
Location / Content-Location headers — from the service root the request was reached at (pure)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class DicomwebUrls:
    """The URLs under one DICOMweb service root ``base`` (e.g. ``https://pacs.example/dicomweb``; no
    trailing slash: one is removed). An empty base gives root-relative paths (``/studies/...``)."""

    base: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", self.base.rstrip("/"))

    def studies(self) -> str:
        return f"{self.base}/studies"

    def study(self, study: str) -> str:
        return f"{self.base}/studies/{study}"

    def series(self, study: str, series: str) -> str:
        return f"{self.base}/studies/{study}/series/{series}"

    def instance(self, study: str, series: str, sop: str) -> str:
        return f"{self.base}/studies/{study}/series/{series}/instances/{sop}"

    def bulkdata(self, study: str, series: str, sop: str, tag: str) -> str:
        return f"{self.instance(study, series, sop)}/bulkdata/{tag}"

    def frames(self, study: str, series: str, sop: str, numbers: str) -> str:
        return f"{self.instance(study, series, sop)}/frames/{numbers}"

    def of(self, level: str, row: Mapping[str, Any]) -> str:
        """The retrieve URL of an index row at a QIDO level (``studies``, ``series``, ``instances``)."""
        if level == "studies":
            return self.study(row["study_uid"])
        if level == "series":
            return self.series(row["study_uid"], row["series_uid"])
        return self.instance(row["study_uid"], row["series_uid"], row["sop_uid"])

    def bulk_of(self, row: Mapping[str, Any]) -> Callable[[str], str]:
        """tag → the BulkDataURI of that attribute of the instance ``row``."""
        instance = self.instance(row["study_uid"], row["series_uid"], row["sop_uid"])
        return lambda tag: f"{instance}/bulkdata/{tag}"


__all__ = ["DicomwebUrls"]
