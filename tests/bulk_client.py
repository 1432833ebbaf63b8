"""A small FHIR Bulk Data client written from the Bulk Data Access IG v2.0.0 text ("Export" page), not from
fedgate's code: kick-off, status polling, manifest, file download, delete.

(No maintained Python bulk-data client is published on PyPI: the registry's list has none, checked for issue 24.)

IG, in short: the kick-off is ``GET [base]/$export`` (or ``Patient/$export``, ``Group/[id]/$export``) with
``Accept: application/fhir+json`` and ``Prefer: respond-async``; success is ``202 Accepted`` with a
``Content-Location`` header naming the status endpoint.  The client polls that URL: ``202`` while in progress
(optionally ``X-Progress``; the client should honour ``Retry-After``), ``200`` with a JSON manifest when done
(``transactionTime``, ``request``, ``requiresAccessToken``, ``output[]`` of ``{type, url[, count]}``,
``error[]``), or ``4XX/5XX`` with an OperationOutcome when the export failed.  Files are fetched with ``GET``
on each ``url`` (with the bearer token when ``requiresAccessToken`` is true, ``Accept:
application/fhir+ndjson``), and ``DELETE`` on the status URL cancels the request / signals completion
(``202``).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlencode

import aiohttp


class BulkError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:500]}")
        self.status = status
        self.body = body


@dataclass
class BulkClient:
    http: aiohttp.ClientSession
    base: str  # the FHIR base URL
    token: str
    #: the longest the client waits between polls (it honours a shorter Retry-After)
    max_wait_s: float = 0.25
    progress: list[str] = field(default_factory=list)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def kickoff(self, path: str = "$export", params: list[tuple[str, str]] | None = None, *,
                      post: bool = False, prefer: str = "respond-async") -> str:
        headers = self._auth() | {"Accept": "application/fhir+json"}
        if prefer:
            headers["Prefer"] = prefer
        url = f"{self.base}/{path}"
        if post:
            # IG: _since is an instant, patient a Reference, the others strings
            body = {"resourceType": "Parameters", "parameter": [
                {"name": k, "valueReference": {"reference": v}} if k == "patient" else
                {"name": k, ("valueInstant" if k == "_since" else "valueString"): v} for k, v in params or []]}
            req = self.http.post(url, data=json.dumps(body), headers=headers | {"Content-Type": "application/fhir+json"})
        else:
            req = self.http.get(url + ("?" + urlencode(params) if params else ""), headers=headers)
        async with req as r:
            text = await r.text()
            if r.status != 202:
                raise BulkError(r.status, text)
            return r.headers["Content-Location"]

    async def poll(self, status_url: str, timeout_s: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            async with self.http.get(status_url, headers=self._auth()) as r:
                text = await r.text()
                if r.status == 200:
                    return json.loads(text)
                if r.status != 202:
                    raise BulkError(r.status, text)
                if "X-Progress" in r.headers:
                    self.progress.append(r.headers["X-Progress"])
                wait = float(r.headers.get("Retry-After", "1"))
            if time.monotonic() > deadline:
                raise TimeoutError(f"export not complete after {timeout_s} s")
            await asyncio.sleep(min(wait, self.max_wait_s))

    async def download(self, manifest: dict) -> dict[str, list[dict]]:
        """Every output file, parsed: type → resources (in file order)."""
        out: dict[str, list[dict]] = {}
        headers = {"Accept": "application/fhir+ndjson"}
        if manifest.get("requiresAccessToken"):
            headers |= self._auth()
        for item in manifest["output"]:
            async with self.http.get(item["url"], headers=headers) as r:
                text = await r.text()
                if r.status != 200:
                    raise BulkError(r.status, text)
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            if "count" in item:
                assert item["count"] == len(lines), (item, len(lines))
            out.setdefault(item["type"], []).extend(lines)
        return out

    async def delete(self, status_url: str) -> int:
        async with self.http.delete(status_url, headers=self._auth()) as r:
            await r.read()
            return r.status

    async def export(self, path: str = "$export", params: list[tuple[str, str]] | None = None,
                     **kw) -> tuple[dict, dict[str, list[dict]]]:
        """Kick-off, poll, download; then delete (the client is done with the files)."""
        url = await self.kickoff(path, params, **kw)
        manifest = await self.poll(url)
        files = await self.download(manifest)
        assert await self.delete(url) == 202
        return manifest, files
