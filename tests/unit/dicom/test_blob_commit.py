"""Blob store commit (issue #3): the rename into place and the directory entries that must reach the disk
before the index rows that point at the file are committed (a power loss must not leave a row whose file
name was lost, which the start-up reconcile would then drop)."""

from __future__ import annotations

from gateway.store.blobs import BlobStore


def _part(store: BlobStore, data: bytes):
    tmp = store.temp_path()
    tmp.write_bytes(data)
    return tmp


def test_commit_renames_and_names_every_directory_whose_entries_changed(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    dirty: set[str] = set()
    rel = store.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    tmp = _part(store, b"first")
    final = store.commit(tmp, rel, dirty=dirty)
    assert final.read_bytes() == b"first" and not tmp.exists()
    root = store.path(rel).parent.parent.parent
    # a new series in a new study: the series directory (the file's entry), the study directory (the
    # series entry) and the store's root (the study entry)
    assert dirty == {str(final.parent), str(final.parent.parent), str(root)}

    dirty.clear()  # a second instance of that series: only the series directory changes
    final2 = store.commit(_part(store, b"second"), store.relative_path("1.2.3", "1.2.3.4", "1.2.3.4.6"), dirty=dirty)
    assert dirty == {str(final2.parent)}

    dirty.clear()  # a new series in the existing study: its directory and the study's
    final3 = store.commit(_part(store, b"third"), store.relative_path("1.2.3", "1.2.3.9", "1.2.3.9.1"), dirty=dirty)
    assert dirty == {str(final3.parent), str(final3.parent.parent)}
    store.sync_dirs(dirty | {str(root)})  # real fsyncs of real directories: no error
    assert store.files() == {p.relative_to(root).as_posix() for p in (final, final2, final3)}


def test_commit_without_a_dirty_set_syncs_itself(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    final = store.commit(_part(store, b"x"), store.relative_path("9", "9.1", "9.1.1"))
    assert final.read_bytes() == b"x"
