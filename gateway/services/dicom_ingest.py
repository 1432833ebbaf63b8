"""DICOMweb ingest (DICOM PS3.18 §10.5 STOW-RS; DIMSE C-STORE and ``fedgate import`` take the same path):
each received part parsed (worker process, :mod:`gateway.services.dicom_parse`) and fsync-ed while the
request is still arriving (:class:`ParseFeed`), the checked files renamed into the blob store
(``gateway/store/blobs.py``), their index rows written by group commit — concurrent requests share one
transaction (:mod:`gateway.store.dicom_index`: patient match, index rows, counts, ImagingStudy sync) —
and the PS3.18 §10.5.3 response dataset.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from gateway.context import Requester
from gateway.services.access import AccessRecord, AuditSink, require_write
from gateway.services.dicom_parse import (CANNOT_UNDERSTAND, DUPLICATE_SOP, OUT_OF_RESOURCES, WARNING_IDENTICAL,
                                          ImportResult, Outcome, Part, parse_parts)
from gateway.services.workers import WorkerPool
from gateway.store import dicom_index
from gateway.store.blobs import BlobStore
from gateway.store.db import Database
from mappings.dicom.urls import DicomwebUrls

log = logging.getLogger(__name__)

#: threads writing and fsync-ing STOW part files: an fsync waits on the disk for milliseconds, so they get
#: threads of their own rather than queueing the next parts' writes (and every other ``to_thread`` user)
#: behind the default executor's cpu + 4
WRITER_THREADS = 16

#: parse calls in flight in this server process (all STOW requests together) below which a part that has
#: arrived goes to the worker at once, beside its request's earlier calls (see ParseFeed)
PARSE_PIPELINE = 4


class ParseFeed:
    """Parse (worker process) and fsync (threads) the parts of one STOW request while it is still arriving.

    :meth:`add` is called by the receiving loop as each part is complete: its fsync starts at once, and it
    is handed to the worker at once while the process has fewer than :data:`PARSE_PIPELINE` parse calls in
    flight (a lightly loaded server: a call's hand-over to the worker process and back costs milliseconds
    of latency, so a request's last part should not wait for its previous call to return), else with
    whatever parts arrived while its request's previous call was being parsed — one call per group, not
    per part, so a busy worker gets bigger groups. :meth:`results` waits for all of it. Neither step ever
    raises for a bad part (failures are in the Outcome / the returned errors).
    """

    _active = 0  # parse calls in flight in this process

    def __init__(self, workers: WorkerPool, study_in_path: str | None) -> None:
        self.workers = workers
        self.study = study_in_path
        self.slots: list[Outcome | None] = []
        self._pending: list[tuple[int, Part]] = []
        self._jobs: set[asyncio.Future] = set()  # this request's parse calls in flight
        self._syncs: list[tuple[Path, asyncio.Future]] = []
        self._writes: dict[int, asyncio.Future] = {}  # part index → its file's write (a failed one fails it)

    def add(self, part: Part, written: asyncio.Future | None = None, synced: asyncio.Future | None = None) -> None:
        """``written``: a future done when the part's file is complete (parsing waits for it; its exception
        fails the part with 0xA700), else the file is complete now. ``synced``: its fsync already under way
        (a future of its OSError or None), else it starts here."""
        self.slots.append(None)
        if part.failure is not None:  # rejected while streaming: nothing to parse
            self.slots[-1] = Outcome(None, None, failure=part.failure, reason=part.reason)
            return
        self._syncs.append((part.tmp, synced if synced is not None else asyncio.ensure_future(self._fsync(part.tmp))))
        i = len(self.slots) - 1
        if written is not None:
            self._writes[i] = written
        if written is None or part.head is not None:  # (the latter: parsed now, while the file is being written)
            self._ready(i, part, None)
        else:
            written.add_done_callback(lambda w: self._ready(i, part, w))

    @staticmethod
    def _failed(written: asyncio.Future) -> bool:
        return written.cancelled() or written.exception() is not None

    def _ready(self, i: int, part: Part, written: asyncio.Future | None) -> None:
        if written is not None and self._failed(written):
            return  # not parsed: results() answers the part 0xA700
        self._pending.append((i, part))
        if not self._jobs or ParseFeed._active < PARSE_PIPELINE:
            self._submit()

    @staticmethod
    async def _fsync(tmp: Path) -> OSError | None:
        try:
            await asyncio.to_thread(BlobStore.fsync, tmp)
        except OSError as exc:
            return exc
        return None

    def _submit(self) -> None:
        group, self._pending = self._pending, []
        job = asyncio.ensure_future(self._parse(group))
        self._jobs.add(job)
        ParseFeed._active += 1
        job.add_done_callback(self._next)

    async def _parse(self, group: list[tuple[int, Part]]) -> None:
        outcomes = await self.workers.run(parse_parts, [p for _, p in group], self.study)
        for (i, p), o in zip(group, outcomes):
            p.head = None  # (parsed: the bytes are not needed any more)
            if not o.retry:
                self.slots[i] = o
                continue
            written = self._writes[i]  # its header needs the file: parse it from the file once written
            if written.done():
                self._ready(i, p, written)
            else:
                written.add_done_callback(lambda w, i=i, p=p: self._ready(i, p, w))

    def _next(self, job: asyncio.Future) -> None:
        self._jobs.discard(job)
        ParseFeed._active -= 1
        if self._pending and not job.cancelled() and (not self._jobs or ParseFeed._active < PARSE_PIPELINE):
            self._submit()

    @staticmethod
    def discard(feed: "ParseFeed | None", parts: list[Part]) -> None:
        """Remove the parts' temp files — a file whose writer thread is still at work once it is done (the
        thread creates it: removed now, it would be left behind)."""
        jobs = {tmp: fut for tmp, fut in feed._syncs} if feed is not None else {}
        for p in parts:
            if p.tmp is None:
                continue
            fut = jobs.get(p.tmp)
            if fut is not None and not fut.done():
                fut.add_done_callback(lambda _f, tmp=p.tmp: _unlink_quietly(tmp))
            _unlink_quietly(p.tmp)

    async def results(self) -> tuple[list[Outcome], dict[Path, OSError]]:
        """Every part's Outcome (in order) and the fsync errors by temp path."""
        if self._writes:  # (their done-callbacks, registered first, have run when this returns)
            await asyncio.gather(*self._writes.values(), return_exceptions=True)
        while self._jobs or self._pending:
            if self._pending and not self._jobs:
                self._submit()
            jobs = set(self._jobs)
            await asyncio.wait(jobs)  # (their _next callbacks, registered first, have run when this returns)
            for job in jobs:
                job.result()  # a failed call (not a failed part: those are Outcomes) fails the request
        for i, written in self._writes.items():  # a part whose file was not written fails, whatever its parse said
            if self._failed(written):
                exc = None if written.cancelled() else written.exception()
                self.slots[i] = Outcome(None, None, failure=OUT_OF_RESOURCES, reason=_disk_reason(exc))
        errors = {tmp: err for tmp, fut in self._syncs if (err := await fut) is not None}
        if any(o is None for o in self.slots):
            raise RuntimeError("STOW: a received part was not parsed")  # a bug: never drop a part silently
        return list(self.slots), errors


@dataclass
class _Batch:
    """One STOW request waiting for its index rows to be written (see ``_index_batched``)."""

    outcomes: list[Outcome]
    turn: asyncio.Future  # result "done" (written by the leader) or "lead" (this request writes next)

class DicomIngest:
    """STOW-RS for the application: owns the part writer threads (:attr:`writers`), the group-commit queue
    and the start-up repair of the blob store. :meth:`close` at shutdown."""

    #: the application's :class:`~gateway.metrics.Metrics` (instances and bytes stored), wired at start-up
    metrics_observer = None

    def __init__(self, db: Database, audit: AuditSink, blobs: BlobStore, workers: WorkerPool | None = None) -> None:
        self.workers = workers or WorkerPool(0)
        self.db = db
        self.audit = audit
        self.blobs = blobs
        #: threads writing received parts to their temp files (see gateway/handlers/stow_body.py)
        self.writers = ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="stow-write")
        self._queue: list[_Batch] = []
        self._leading = False

    async def close(self) -> None:
        """Wait for the part writes still in flight and stop the writer threads."""
        await asyncio.to_thread(self.writers.shutdown, True)

    def parse_feed(self, study_in_path: str | None) -> "ParseFeed":
        """A feed for the parts of one STOW request: each part is parsed and fsync-ed as soon as it has
        arrived, while the rest of the body is still being received (see :class:`ParseFeed`)."""
        return ParseFeed(self.workers, study_in_path)

    async def store(self, requester: Requester, parts: list[Part], study_in_path: str | None,
                    retrieve_base: "DicomwebUrls | str", feed: "ParseFeed | None" = None,
                    outcomes_out: list | None = None) -> tuple[int, dict]:
        """Store the received parts; returns (HTTP status, DICOM JSON response dataset) per PS3.18 10.5.3.
        ``feed``: the :meth:`parse_feed` the parts were given to while they arrived (else they are parsed now).
        ``outcomes_out``: if given, receives every part's :class:`Outcome`, in the order of ``parts``.
        ``retrieve_base``: the service root the RetrieveURLs name (a builder, or its base URL)."""
        urls = retrieve_base if isinstance(retrieve_base, DicomwebUrls) else DicomwebUrls(retrieve_base)
        try:
            require_write(requester)
            if feed is None:
                feed = self.parse_feed(study_in_path)
                for p in parts:
                    feed.add(p)
            # the rename into place below happens only for instances that passed every check
            outcomes, sync_errors = await feed.results()
        except BaseException:  # refused or cancelled: no temp file left behind
            ParseFeed.discard(feed, parts)
            raise
        if self.blobs.unwritable:  # a read-only store: every instance 0xA700, nothing half stored
            for o in outcomes:
                if o.failure in (None, OUT_OF_RESOURCES):  # (its part's file could not be written either)
                    o.failure, o.reason = OUT_OF_RESOURCES, (f"the DICOM store cannot be written "
                                                             f"({self.blobs.unwritable}): nothing was stored")
        for o in outcomes:  # a part whose file did not reach the disk (fsync failed: EIO, ENOSPC): 0xA700
            if o.failure is None and (err := sync_errors.get(o.tmp)) is not None:
                o.failure, o.reason = OUT_OF_RESOURCES, _disk_reason(err)
        # the same SOP twice in one request: keep the first
        seen: set[str] = set()
        for o in outcomes:
            if o.failure is None:
                if o.sop_uid in seen:
                    o.failure, o.reason = DUPLICATE_SOP, "the SOP Instance UID occurs twice in this request"
                seen.add(o.sop_uid)
        good = [o for o in outcomes if o.failure is None]
        committed: list[Outcome] = []
        try:
            if good:
                await self._check_duplicates(good)
                new = [o for o in good if o.failure is None and o.warning is None]
                # files go into place before (and outside) the write transaction: rename only (already
                # fsync-ed), never under the (SQLite: serialised) write lock; each stored version gets its own path
                await asyncio.to_thread(self._commit_files, new, committed)
                new = [o for o in new if o.failure is None]  # (a file that could not be put in place: 0xA700)
                if new:
                    await self._index_batched(new)
        finally:
            for o in committed:  # rows not written (error, cancellation): no file without its row
                if not o.indexed and o.failure is None:
                    self.blobs.remove(o.rel)
            if good:
                self.blobs.pending(done=[o.rel for o in good if o.rel])
            ParseFeed.discard(feed, parts)
        if good:
            self.db.note_writes(len(good))
        stored = [o for o in outcomes if o.failure is None]
        failed = [o for o in outcomes if o.failure is not None]
        if outcomes_out is not None:
            outcomes_out.extend(outcomes)
        if self.metrics_observer is not None:
            dup = sum(1 for o in stored if o.warning == WARNING_IDENTICAL)
            self.metrics_observer.observe_stow(len(stored) - dup, dup, len(failed),
                                               sum(o.size for o in stored if o.warning != WARNING_IDENTICAL))
        await self.audit.record(AccessRecord(
            requester, "C", "stow", "0" if not failed else ("4" if stored else "8"),
            tuple(f"ImagingStudy/{u}" for u in sorted({o.study_uid for o in stored}))[:200], (), "", "",
        ))
        body: dict[str, Any] = {}
        if study_in_path:
            body["00081190"] = {"vr": "UR", "Value": [urls.study(study_in_path)]}
        if failed:
            body["00081198"] = {"vr": "SQ", "Value": [self._failed_item(o) for o in failed]}
        if stored:
            body["00081199"] = {"vr": "SQ", "Value": [self._ref_item(o, urls) for o in stored]}
        # PS3.18 10.5.3: 200 all stored cleanly, 202 some failed or warned, 409 none stored
        status = 409 if not stored else (202 if failed or any(o.warning for o in stored) else 200)
        return status, body

    @staticmethod
    def _failed_item(o: Outcome) -> dict:
        item: dict[str, Any] = {"00081197": {"vr": "US", "Value": [o.failure]}}
        if o.sop_class:
            item["00081150"] = {"vr": "UI", "Value": [o.sop_class]}
        if o.sop_uid:
            item["00081155"] = {"vr": "UI", "Value": [o.sop_uid]}
        if o.reason:
            item["00090010"] = {"vr": "LO", "Value": ["FEDGATE"]}
            item["00091010"] = {"vr": "LT", "Value": [o.reason]}  # private: human-readable reason
        return item

    @staticmethod
    def _ref_item(o: Outcome, urls: DicomwebUrls) -> dict:
        item = {
            "00081150": {"vr": "UI", "Value": [o.sop_class]},
            "00081155": {"vr": "UI", "Value": [o.sop_uid]},
            "00081190": {"vr": "UR", "Value": [urls.instance(o.study_uid, o.series_uid, o.sop_uid)]},
        }
        if o.warning:
            item["00081196"] = {"vr": "US", "Value": [o.warning]}
        return item

    async def _check_duplicates(self, good: list[Outcome]) -> None:
        """Already stored SOP Instance UIDs: identical bytes → warning (no change), different → 0x0111."""
        existing = await dicom_index.stored_blob_paths(self.db, [o.sop_uid for o in good])
        for o in good:
            if o.sop_uid in existing:
                same = await asyncio.to_thread(
                    lambda: BlobStore.digest(self.blobs.path(existing[o.sop_uid])) == BlobStore.digest(o.tmp))
                if same:
                    o.warning = WARNING_IDENTICAL
                else:
                    o.failure, o.reason = DUPLICATE_SOP, ("an instance with this SOP Instance UID and different "
                                                          "content is already stored")

    def _commit_files(self, new: list[Outcome], done: list[Outcome]) -> None:
        """Rename the (fsync-ed) files into place, then fsync their directories. The storage failing
        (ENOSPC for a new directory, EIO, ...) fails the instances concerned with 0xA700 — the others of
        the request go on; a directory fsync failing fails every file renamed into place here (removed)."""
        dirty: set[str] = set()
        for o in new:
            try:
                o.rel = self.blobs.relative_path(o.study_uid, o.series_uid, o.sop_uid)
            except ValueError:  # (parsing checked the UIDs already: a second line of defence)
                o.failure, o.reason = CANNOT_UNDERSTAND, "a UID of the instance cannot name a storage path"
        # journalled before the renames: if this process dies before their rows are committed, the process
        # started in its place removes the files that got no row (see BlobStore.pending / adopt_dead_journals)
        self.blobs.pending(add=[o.rel for o in new if o.failure is None])
        for o in new:
            if o.failure is not None:
                continue
            try:
                self.blobs.commit(o.tmp, o.rel, fsynced=True, dirty=dirty)
            except OSError as exc:  # nothing was moved (mkdir / rename failed): the temp file is removed later
                o.failure, o.reason = OUT_OF_RESOURCES, _disk_reason(exc)
                continue
            done.append(o)
        try:
            self.blobs.sync_dirs(dirty)  # before the index rows: no acknowledged row whose file name may be lost
        except OSError as exc:
            for o in done:
                self.blobs.remove(o.rel)
                o.failure, o.reason = OUT_OF_RESOURCES, _disk_reason(exc)
            done.clear()

    async def _index_batched(self, new: list[Outcome]) -> None:
        """Index rows of concurrent STOW requests written in one transaction (group commit).

        The first request that finds no transaction in progress leads: it opens the write transaction and
        only then takes everything queued (its own instances and those of requests that arrived meanwhile,
        including while it waited for the write lock — another server process's transaction, an audit
        flush), writes them, marks them ``indexed``, wakes their requests, and hands the lead to the next
        queued request, if any. At concurrency 1 this is one transaction per request as before; at 16 the
        per-transaction work (patient match, study and series counts, ImagingStudy sync) is shared by
        every request in the batch. If a batch of several requests fails, each request is retried in a
        transaction of its own, so one request's failure never fails another's.
        """
        entry = _Batch(new, asyncio.get_running_loop().create_future())
        self._queue.append(entry)
        if self._leading and await self._wait_turn(entry) == "done":
            return
        self._leading = True
        taken: list[_Batch] = []
        written = False
        try:
            await self._write_group(entry, taken)
            written = True
        finally:
            if not written:  # our own failure (or cancellation): the others go back to the queue, untouched
                if entry in self._queue:  # failed before taking the queue (waiting for the write lock)
                    self._queue.remove(entry)
                self._queue[:0] = [b for b in taken if b is not entry and not b.turn.done()]
            self._leading = False
            if self._queue:  # hand the lead on
                self._leading = True
                self._queue[0].turn.set_result("lead")

    async def _wait_turn(self, entry: _Batch) -> str:
        """Wait until a leader wrote our rows ("done") or handed us the lead ("lead")."""
        try:
            return await asyncio.shield(entry.turn)
        except asyncio.CancelledError:
            if entry in self._queue:  # not taken by a leader: nothing of ours is being written
                self._queue.remove(entry)
                if entry.turn.done() and not entry.turn.exception() and self._queue:  # we had the lead: pass it
                    self._queue[0].turn.set_result("lead")
                elif entry.turn.done():
                    self._leading = bool(self._queue)
                raise
            while not entry.turn.done():  # a leader is writing our rows: let it finish so rows and files agree
                try:
                    await asyncio.shield(entry.turn)
                except asyncio.CancelledError:
                    continue
                except SQLAlchemyError:
                    break
            raise

    async def _write_group(self, entry: _Batch, taken: list[_Batch]) -> None:
        """Write the queued requests (``entry``, the leader's, among them) in one transaction; the queue is
        taken into ``taken`` once the transaction holds the write lock."""
        try:
            async with self.db.write(inline=True) as conn:  # short, many small statements: see Database.write
                # the batch is taken only now: requests that arrived while the lock was busy join it
                taken[:], self._queue = self._queue, []
                outcomes = [o for b in taken for o in b.outcomes]
                await self._index(conn, outcomes)
        except SQLAlchemyError:
            if len(taken) <= 1:
                raise
            for b in taken:  # isolate the failing request: each in a transaction of its own
                if b is entry:
                    continue
                try:
                    await self._write_batch(b.outcomes)
                except SQLAlchemyError as exc:
                    b.turn.set_exception(exc)
                else:
                    b.turn.set_result("done")
            await self._write_batch(entry.outcomes)
            return
        for o in outcomes:
            o.indexed = True
        for b in taken:
            if b is not entry:
                b.turn.set_result("done")

    async def _write_batch(self, outcomes: list[Outcome]) -> None:
        async with self.db.write(inline=True) as conn:
            await self._index(conn, outcomes)
        for o in outcomes:
            o.indexed = True

    async def _index(self, conn, good: list[Outcome]) -> None:
        """Index rows, study/series counts and the FHIR ImagingStudy of a batch, on ``conn`` (one
        transaction: :func:`gateway.store.dicom_index.insert_batch`). Two instances of the batch with one SOP
        Instance UID: the first wins; one another request stored first fails with 0x0111."""
        await dicom_index.lock_stow(conn)
        now = time.time()
        pids, nos = await dicom_index.patient_ids(conn, [(o.patient_key, o.patient_meta) for o in good])
        batch: dict[str, Outcome] = {}
        for o in good:
            if o.failure is not None:  # found raced by an earlier try of this batch
                continue
            if o.sop_uid in batch:  # two requests of this batch with one SOP Instance UID: the first wins
                o.failure, o.reason = DUPLICATE_SOP, "stored concurrently by another request"
                self.blobs.remove(o.rel)
                continue
            batch[o.sop_uid] = o
        inserted = await dicom_index.insert_batch(conn, list(batch.values()), pids, nos, now)
        for o in batch.values():
            if o.sop_uid not in inserted:
                o.failure, o.reason = DUPLICATE_SOP, "stored concurrently by another request"
                self.blobs.remove(o.rel)

    async def bulk_import(self, requester: Requester, files: list[Path]) -> list["ImportResult"]:
        """Store files already on disk (``fedgate import``) through the same path as STOW-RS; one
        :class:`ImportResult` per file, in order: stored, duplicate (identical instance already stored)
        or failed with the reason STOW would give."""
        import shutil

        parts = []
        for f in files:
            tmp = self.blobs.temp_path()
            shutil.copyfile(f, tmp)
            parts.append(Part(tmp, tmp.stat().st_size))
        outcomes: list[Outcome] = []
        await self.store(requester, parts, None, "", outcomes_out=outcomes)
        results = []
        for f, o in zip(files, outcomes):
            if o.failure is not None:
                results.append(ImportResult(str(f), "failed", o.sop_uid, o.reason or f"DICOM status 0x{o.failure:04X}"))
            else:
                results.append(ImportResult(str(f), "duplicate" if o.warning == WARNING_IDENTICAL else "stored",
                                            o.sop_uid))
        return results

    async def adopt_dead_journals(self) -> None:
        """In a serving process (``--processes N``): a sibling that died (kill -9) between renaming files
        into place and committing their rows left them listed in its journal; those without a row are
        removed now, so no file without its row waits for the next parent start."""
        if self.blobs.unwritable:
            return
        journals = await asyncio.to_thread(self.blobs.dead_journals)
        for journal, rels in journals:
            found = await dicom_index.indexed_among(self.db, rels)
            gone = [r for r in rels if r not in found]
            for rel in gone:
                self.blobs.remove(rel)
            journal.unlink(missing_ok=True)
            if gone:
                log.warning("files of a dead server process without index rows removed", extra={"count": len(gone)})

    async def reconcile(self) -> None:
        """Start-up repair: temp files and unindexed files removed, rows without files dropped (not on a
        store that cannot be written: it is served read-only, as found)."""
        if self.blobs.unwritable:
            log.warning("blob store is not writable: serving it read-only (STOW answers 0xA700)",
                        extra={"error_type": self.blobs.unwritable})
            return
        indexed = await dicom_index.indexed_blob_paths(self.db)
        removed, missing = await asyncio.to_thread(self.blobs.reconcile, indexed)
        if missing:
            await dicom_index.drop_rows_of_missing_files(self.db, missing)
        if removed or missing:
            log.warning("blob store reconciled", extra={"files_removed": removed, "rows_removed": len(missing)})



def _unlink_quietly(path: Path) -> None:
    """Remove a temp file; one that cannot be removed (a store gone read-only) is left to the start-up
    reconcile rather than failing the request whose instances were already answered for."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("a temp file could not be removed", extra={"error_type": os.strerror(exc.errno or 0)})


def _disk_reason(exc: BaseException | None) -> str:
    """A failure reason for a storage error (a part's write, its fsync, its rename, a directory fsync): what
    went wrong — the OS's words for an OSError —, never the path (it names the UIDs)."""
    code = getattr(exc, "errno", None)
    what = os.strerror(code) if code else type(exc).__name__ if exc is not None else "the write was cancelled"
    return f"the instance could not be stored: {what}"[:300]



__all__ = ["DicomIngest", "ParseFeed", "WRITER_THREADS"]
