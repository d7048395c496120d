"""Incremental mirroring as a put strategy: files travel as content-addressed parts, and parts the store already
holds are not sent again (see :mod:`syncckpt.blobs`).

The commit sequence is the remote's one (:meth:`~syncckpt.remote.base.Remote.commit_checkpoint`); only how the
data travels differs. The manifest the store holds lists each file's parts, so LATEST is computed from it.

>>> import pathlib, tempfile
>>> from syncckpt.manifest import FileEntry, Manifest, sha256_hex
>>> from syncckpt.remote import open_remote
>>> src = pathlib.Path(tempfile.mkdtemp())
>>> _ = (src / "model.safetensors").write_bytes(b"weights")
>>> m = Manifest(name="checkpoint-step-1", kind="step", global_step=1, epoch=0, batch_idx=0,
...              files=[FileEntry("model.safetensors", 7, sha256_hex(b"weights"))])
>>> r, put = open_remote("memory://doc-incremental/run"), BlobPut()
>>> done = r.commit_checkpoint(m.name, src, m, m.to_bytes(), None, put=put)
>>> len(done.manifest.files[0].parts), r.list_blobs() == [sha256_hex(b"weights")]
(1, True)
>>> put.collect_unused(r, {})  # still referenced
[]
>>> r.delete_checkpoint(m.name); put.collect_unused(r, {}) == [sha256_hex(b"weights")]
True
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .._memory import ByteBudget
from ..blobs import blob_rel, part_ranges
from ..errors import RemoteError
from ..manifest import Manifest, sha256_hex
from .base import ProgressFn, Remote

__all__ = ["BlobPut"]

# Parts are read whole and held until sent; parts go up to blobs.CHUNK_BYTES (64 MiB), so bound their bytes, not
# their number (max_workers x 64 MiB, plus the copy the client makes, was 0.5 GB over the staging buffers).
_BLOB_BYTES_IN_FLIGHT = 128 << 20


class BlobPut:
    """Put strategy for incremental runs. Remembers which blobs the store holds (listed once, then kept up to date
    by its own uploads and :meth:`collect_unused`), so one instance serves one run's commits, one at a time."""

    def __init__(self) -> None:
        self.known: set[str] | None = None

    def __call__(
        self, remote: Remote, name: str, local_dir: Path, manifest: Manifest, progress: ProgressFn | None
    ) -> tuple[Manifest, int]:
        """Upload the parts of ``manifest``'s files that the store lacks, check their sizes in the store, and
        return the manifest listing every file's parts, with the bytes sent."""
        if self.known is None:
            self.known = set(remote.list_blobs())
        queued: dict[str, int] = {}
        budget = ByteBudget(_BLOB_BYTES_IN_FLIGHT)

        def put(digest: str, data: bytes) -> None:
            try:
                remote.write_bytes(blob_rel(digest), data)
            finally:
                budget.release(len(data))

        entries, futures = [], []
        with ThreadPoolExecutor(remote.max_workers, thread_name_prefix="syncckpt-blob") as ex:
            for e in manifest.files:
                parts = []
                with open(local_dir / e.path, "rb") as f:
                    head = f.read(min(e.size, 1 << 20))
                    for offset, size in part_ranges(head, e.size):
                        f.seek(offset)
                        data = f.read(size)
                        digest = sha256_hex(data)
                        parts.append((size, digest))
                        if digest not in self.known and digest not in queued:
                            queued[digest] = size
                            budget.acquire(size)  # parts read ahead of the upload stay within the budget
                            futures.append(ex.submit(put, digest, data))
                entries.append(dataclasses.replace(e, parts=tuple(parts)))
            for fut in futures:
                fut.result()
        self._check_sizes(remote, queued)
        self.known.update(queued)
        return dataclasses.replace(manifest, files=entries), sum(queued.values())

    def collect_unused(self, remote: Remote, manifests: dict[str, Manifest]) -> list[str]:
        """Delete the blobs no remaining checkpoint refers to (see ``Remote.collect_unused_blobs``)."""
        unused = remote.collect_unused_blobs(manifests, self.known)
        if self.known is not None:
            self.known -= set(unused)
        return unused

    @staticmethod
    def _check_sizes(remote: Remote, sent: dict[str, int]) -> None:
        """Sizes in the store, without downloading, as for whole files."""
        stats = remote._parallel(lambda d: remote.stat(blob_rel(d)), list(sent))
        for (digest, size), st in zip(sent.items(), stats, strict=True):
            if st.size != size:
                raise RemoteError(f"{remote.url}/{blob_rel(digest)}: store holds {st.size} bytes, expected {size}")
