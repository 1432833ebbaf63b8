"""On-disk blob store for DICOM instances: atomic write, then index; reconciled at start-up.

Write protocol (one instance):
  1. the request body part is streamed to ``tmp/<unique>.part`` (memory does not grow with its size);
  2. the file is parsed and checked; on failure it is deleted;
  3. it is ``fsync``-ed and renamed to ``<study>/<series>/<sop>.dcm`` (atomic on POSIX), and the
     directories that got new entries are ``fsync``-ed (once per batch), so the names survive a power loss;
  4. the index rows are written in one database transaction; if that fails the file is removed.

A crash between 3 and 4 leaves a file without a row; a crash during 1–2 leaves a temp file.
:meth:`BlobStore.reconcile` (run at start-up) removes both, and removes index rows whose file is gone,
so after any failure there is no row without its file and no file without its row.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import threading
import os
import secrets
import re
from pathlib import Path

_SAFE_UID = re.compile(r"[0-9]{1,64}(?:\.[0-9]{1,64}){0,63}")


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"
        #: why nothing can be stored (a read-only mount, no permission), or None: the store still serves reads
        #: and STOW fails each instance with 0xA700 and this reason (checked at start; a store that becomes
        #: read-only later fails the same way, part by part, on its first write)
        self.unwritable: str | None = None
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            if not os.access(self.tmp, os.W_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as exc:
            self.unwritable = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        self._real_root = os.path.realpath(root)
        self._tmp_prefix = f"{secrets.token_hex(8)}-{os.getpid()}-"
        self._tmp_seq = itertools.count()
        #: files this process renamed into place whose index rows are not committed yet, mirrored in its
        #: journal ``tmp/<prefix>journal``: when the process dies (kill -9) between rename and commit, the
        #: process started in its place removes exactly those files that got no row (:meth:`dead_journals`)
        #: — without waiting for a full reconcile at the next parent start
        self._pending: set[str] = set()
        self._journal = self.tmp / f"{self._tmp_prefix}journal"
        self._journal_lock = threading.Lock()

    def temp_path(self) -> Path:
        """A new temp file name: a random prefix per store (per process) and a counter — unique without a
        call for random bytes per part (a ``getrandom`` system call each)."""
        return self.tmp / f"{self._tmp_prefix}{next(self._tmp_seq)}.part"

    @staticmethod
    def relative_path(study_uid: str, series_uid: str, sop_uid: str) -> str:
        """A fresh path per stored version (a random suffix), so a new file never overwrites a stored one.
        Only UIDs (PS3.5 §9.1: digits in components separated by single periods) make a path: no value
        can name another directory (".", "..", "/", NUL), so the path stored in the index is the file's
        path on disk, after any normalisation (an instance with StudyInstanceUID "." was acknowledged,
        then deleted by the start-up reconcile: ``study/./sop`` is not how the disk lists it)."""
        for uid in (study_uid, series_uid, sop_uid):
            if not _SAFE_UID.fullmatch(uid or ""):
                raise ValueError("a storage path is made of UIDs only")
        return f"{study_uid}/{series_uid}/{sop_uid}.{secrets.token_hex(4)}.dcm"

    def pending(self, add: list[str] = (), done: list[str] = ()) -> None:
        """Note files about to be renamed into place (``add``, before the rename) or settled (``done``: their
        rows committed, or the files removed); the journal file is rewritten (no fsync: it is for a process
        crash, which keeps the page cache; after a power loss the start-up reconcile covers everything)."""
        with self._journal_lock:
            self._pending.update(add)
            self._pending.difference_update(done)
            if not self._pending:
                self._journal.unlink(missing_ok=True)
                return
            tmp = self._journal.with_name(self._journal.name + ".new")
            tmp.write_text("\n".join(sorted(self._pending)) + "\n")
            os.replace(tmp, self._journal)

    def dead_journals(self) -> list[tuple[Path, list[str]]]:
        """Journals of server processes that are gone, with the files they had in flight."""
        out = []
        for j in self.tmp.glob("*-*-journal"):
            try:
                pid = int(j.name.rsplit("-", 2)[1])
            except (IndexError, ValueError):
                continue
            if pid == os.getpid() or _alive(pid):
                continue
            try:
                rels = [r for r in j.read_text().splitlines() if r]
            except OSError:
                continue
            out.append((j, rels))
        return out

    def path(self, rel: str) -> Path:
        """The file of a relative blob path (string checks only: no per-request filesystem walk)."""
        return Path(self.file(rel))

    def file(self, rel: str) -> str:
        """:meth:`path` as a string (no Path object: a series answer asks for hundreds)."""
        full = os.path.normpath(os.path.join(self._real_root, rel))
        if not full.startswith(self._real_root + os.sep) or "\0" in full:
            raise ValueError("blob path escapes the store")
        return full

    @staticmethod
    def fsync(tmp: Path) -> None:
        """Flush a temp file's data to disk (step 3's fsync, run early so it overlaps parsing)."""
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())

    def commit(self, tmp: Path, rel: str, *, fsynced: bool = False, dirty: set[str] | None = None) -> Path:
        """fsync (unless the caller did already) + atomic rename of a temp file to its final place.
        ``dirty``: collects the directories whose entries changed (the file's, and those of directories
        created for it), for :meth:`sync_dirs` before the index rows are committed; without it the
        directories are synced here."""
        final = self.path(rel)
        parent = final.parent
        changed = {str(parent)}
        if not parent.is_dir():  # a new series (perhaps study) directory: its own entry must reach the disk too
            changed.add(str(parent.parent))
            if not parent.parent.is_dir():
                changed.add(str(parent.parent.parent))
            parent.mkdir(parents=True, exist_ok=True)
        if not fsynced:
            self.fsync(tmp)
        os.replace(tmp, final)
        if dirty is None:
            self.sync_dirs(changed)
        else:
            dirty.update(changed)
        return final

    @staticmethod
    def sync_dirs(dirs: set[str]) -> None:
        """fsync directories, so that renames into them survive a power loss: the file's data was synced
        before its rename, but the new name lives in the directory (POSIX: fsync the directory too).  Done
        once per STOW batch, before the index rows that point at the files are committed."""
        for d in sorted(dirs):
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def remove(self, rel: str) -> None:
        try:
            self.path(rel).unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def digest(path: Path) -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def files(self) -> set[str]:
        """Relative paths of every committed blob."""
        out = set()
        for p in self.root.rglob("*.dcm"):
            if self.tmp not in p.parents:
                out.add(p.relative_to(self.root).as_posix())
        return out

    @staticmethod
    def remove_temp_files_of(root: Path, pid: int) -> int:
        """Remove the temp files of a server process that is gone (its pid is in their names, see
        :meth:`temp_path`): run by the supervising parent when a child exits (kill -9 included), so a
        dead child's temp files do not wait for a parent restart. Files of live processes are not touched."""
        removed = 0
        for p in (root / "tmp").glob(f"*-{int(pid)}-*.part"):
            p.unlink(missing_ok=True)
            removed += 1
        return removed

    def reconcile(self, indexed: set[str]) -> tuple[int, set[str]]:
        """Remove temp files and files without an index row; returns (files removed, rows without a file)."""
        removed = 0
        for j in self.tmp.glob("*-*-journal*"):  # (every in-flight file is judged below, by its row)
            j.unlink(missing_ok=True)
        for p in self.tmp.glob("*.part"):
            p.unlink(missing_ok=True)
            removed += 1
        on_disk = self.files()
        for rel in on_disk - indexed:
            self.remove(rel)
            removed += 1
        return removed, indexed - on_disk


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
