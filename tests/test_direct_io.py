"""A save's data files written past the page cache (``write_file(direct=True)``) and read past it for the upload
(``read_direct``): the same bytes, digest and CRC32C as the buffered path, at every size around the block and
buffer edges, and the page cache really left alone where the file system allows it."""

from __future__ import annotations

import ctypes
import mmap
import os
import random
from pathlib import Path

import pytest

from syncckpt import local
from syncckpt.manifest import sha256_hex

BLOCK, FLUSH = local.DIRECT_BLOCK, 8 << 20
SIZES = [0, 1, BLOCK - 1, BLOCK, BLOCK + 1, FLUSH - 1, FLUSH, FLUSH + 1, 2 * FLUSH + BLOCK + 17]


def pieces(data: bytes, first: int, rest: int) -> list[memoryview]:
    """A small header-like first piece, then pieces that never line up with a block or the buffer."""
    view = memoryview(data)
    out = [view[:first]]
    for i in range(first, len(data), rest):
        out.append(view[i : i + rest])
    return out


@pytest.mark.parametrize("size", SIZES)
def test_a_direct_write_holds_the_bytes_digest_and_crc32c_of_a_buffered_one(tmp_path: Path, size: int) -> None:
    data = random.Random(size).randbytes(size)
    direct = local.write_file(tmp_path / "d", "x.bin", pieces(data, 137, 3_000_017), crc32c=True, direct=True)
    plain = local.write_file(tmp_path / "p", "x.bin", pieces(data, 137, 3_000_017), crc32c=True)
    assert (tmp_path / "d" / "x.bin").read_bytes() == data
    assert direct == plain and direct.sha256 == sha256_hex(data) and direct.size == size


def test_a_chunk_may_be_refilled_as_soon_as_write_returns(tmp_path: Path) -> None:
    rng = random.Random(3)
    expected = bytearray()
    reused = bytearray(5 << 20)  # over the size at which HashingWriter hashes on its helper thread

    def chunks():
        for _ in range(5):
            reused[:] = rng.randbytes(len(reused))
            expected.extend(reused)
            yield memoryview(reused)

    entry = local.write_file(tmp_path, "r.bin", chunks(), direct=True)
    assert (tmp_path / "r.bin").read_bytes() == bytes(expected)
    assert entry.sha256 == sha256_hex(bytes(expected))


def test_a_failing_source_leaves_no_open_file(tmp_path: Path) -> None:
    def chunks():
        yield b"a" * (FLUSH + 5)
        raise RuntimeError("the source failed")

    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(RuntimeError, match="the source failed"):
        local.write_file(tmp_path, "f.bin", chunks(), direct=True)
    assert len(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("size", SIZES)
def test_read_direct_returns_exactly_the_first_size_bytes(tmp_path: Path, size: int) -> None:
    data = random.Random(size + 1).randbytes(size + 100)  # the file is longer: only ``size`` bytes come back
    (tmp_path / "f.bin").write_bytes(data)
    got = list(local.read_direct(tmp_path / "f.bin", size))
    assert b"".join(got) == data[:size]
    assert all(len(c) <= FLUSH for c in got)


def test_read_direct_reuses_a_buffer_only_once_no_view_of_it_is_left(tmp_path: Path) -> None:
    data = random.Random(9).randbytes(5 * FLUSH + 3)
    (tmp_path / "f.bin").write_bytes(data)
    kept = list(local.read_direct(tmp_path / "f.bin", len(data)))  # every view held: none may be refilled
    assert b"".join(kept) == data and len({id(v.obj) for v in kept}) == 6
    streamed, buffers = bytearray(), set()
    for view in local.read_direct(tmp_path / "f.bin", len(data)):  # each view dropped before the next read
        streamed += view
        buffers.add(id(view.obj))
        view.release()
    assert bytes(streamed) == data and len(buffers) == 1


def test_read_direct_of_a_file_shorter_than_announced_fails(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"x" * (BLOCK + 3))
    with pytest.raises(OSError, match=f"ended 7 bytes before its {BLOCK + 10}"):
        b"".join(local.read_direct(tmp_path / "f.bin", BLOCK + 10))


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a tmpfs at /dev/shm (no O_DIRECT there)")
def test_a_file_system_without_o_direct_gets_the_same_bytes_through_the_page_cache() -> None:
    data = random.Random(11).randbytes(FLUSH + 4097)
    folder = Path("/dev/shm") / f"syncckpt-direct-{os.getpid()}"
    try:
        entry = local.write_file(folder, "f.bin", pieces(data, 10, 1 << 20), direct=True)
        assert (folder / "f.bin").read_bytes() == data and entry.sha256 == sha256_hex(data)
        assert b"".join(local.read_direct(folder / "f.bin", len(data))) == data
    finally:
        (folder / "f.bin").unlink(missing_ok=True)
        folder.rmdir()


def resident_fraction(path: Path) -> float:
    """How much of ``path`` the page cache holds (mincore(2) on an untouched mapping of it)."""
    size = path.stat().st_size
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # writable, for its address only
    try:
        holder = ctypes.c_char.from_buffer(mapping)
        vec = ctypes.create_string_buffer(pages)
        if libc.mincore(ctypes.addressof(holder), size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        del holder
        return sum(b & 1 for b in vec.raw) / pages
    finally:
        mapping.close()


def direct_io_works(folder: Path) -> bool:
    try:
        fd = os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except (OSError, AttributeError):
        return False
    os.close(fd)
    (folder / ".probe").unlink()
    return True


def test_a_direct_write_and_read_leave_the_page_cache_alone(tmp_path: Path) -> None:
    if not direct_io_works(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT (covered by the tmpfs test)")
    data = random.Random(5).randbytes(4 * FLUSH)
    local.write_file(tmp_path / "p", "f.bin", pieces(data, 100, FLUSH))
    local.write_file(tmp_path / "d", "f.bin", pieces(data, 100, FLUSH), direct=True)
    assert resident_fraction(tmp_path / "p" / "f.bin") > 0.9  # the measure sees a buffered write's pages
    assert resident_fraction(tmp_path / "d" / "f.bin") < 0.01
    assert b"".join(local.read_direct(tmp_path / "d" / "f.bin", len(data))) == data
    assert resident_fraction(tmp_path / "d" / "f.bin") < 0.01


def test_syncckpt_direct_io_0_sends_every_file_through_the_page_cache(tmp_path: Path, monkeypatch) -> None:
    if not direct_io_works(tmp_path):
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT: nothing to turn off")
    monkeypatch.setenv(local.DIRECT_IO_ENV, "0")
    data = random.Random(6).randbytes(2 * FLUSH + 1)
    entry = local.write_file(tmp_path, "f.bin", pieces(data, 100, FLUSH), direct=True)
    assert (tmp_path / "f.bin").read_bytes() == data and entry.sha256 == sha256_hex(data)
    assert resident_fraction(tmp_path / "f.bin") > 0.9
