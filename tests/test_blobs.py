"""Content-addressed parts: where a file is cut, and that unchanged tensors keep their parts' digests.

``part_ranges`` reads only a file's first bytes and its size, so multi-GB layouts are checked from a header alone,
without allocating their data.
"""

from __future__ import annotations

import json
import struct
import uuid

import pytest
import safetensors.torch
import torch

from syncckpt.blobs import BLOB_DIR, CHUNK_BYTES, GROUP_BYTES, blob_rel, part_ranges
from syncckpt.format import flatten_state, iter_file_chunks, plan_layout
from syncckpt.manifest import sha256_hex
from syncckpt.remote import open_remote
from syncckpt.snapshot import StagingArena, take_snapshot

MiB = 1 << 20


def header_only(tensors: dict[str, tuple[int, int]], pad: int = 0) -> tuple[bytes, int]:
    """The first bytes of a safetensors file whose tensors sit at ``data_offsets`` (no data), and its size."""
    header = {
        name: {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}
        for name, (begin, end) in tensors.items()
    }
    raw = json.dumps(header).encode()
    end = max((e for _, e in tensors.values()), default=0)
    return struct.pack("<Q", len(raw)) + raw, 8 + len(raw) + end + pad


def parts_of(data: bytes) -> list[tuple[int, int]]:
    return part_ranges(data[: 1 << 20], len(data))


def digests(data: bytes) -> list[str]:
    return [sha256_hex(data[o : o + n]) for o, n in parts_of(data)]


def assert_covers(parts: list[tuple[int, int]], size: int) -> None:
    """Parts are back to back, in order, and their concatenation is the whole file."""
    offset = 0
    for o, n in parts:
        assert o == offset and n >= 0, parts
        offset += n
    assert offset == size, parts


def tensor_bounds(data: bytes) -> set[int]:
    """Absolute offsets where a tensor starts or ends (plus the end of the header)."""
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + hlen])
    bounds = {8 + hlen}
    for name, info in header.items():
        if name != "__metadata__":
            bounds.update(8 + hlen + x for x in info["data_offsets"])
    return bounds


def model_file(head_scale: float = 0.0, frozen_scale: float = 1.0) -> bytes:
    """A frozen backbone big enough for its own part, a group of small tensors, and a small trainable head."""
    torch.manual_seed(0)
    return safetensors.torch.save(
        {
            "backbone.weight": torch.randn(300_000) * frozen_scale,  # 1.2 MB: over GROUP_BYTES
            "norm.weight": torch.ones(64),
            "norm.bias": torch.zeros(64),
            "head.weight": torch.full((16,), head_scale),
        }
    )


# ---- blob_rel ------------------------------------------------------------------------------------------------
def test_a_blob_lives_under_blobs_by_its_digest_where_the_remote_lists_it():
    digest = sha256_hex(b"part")
    assert blob_rel(digest) == f"{BLOB_DIR}/{digest}" == f"blobs/{digest}"
    remote = open_remote(f"memory://test-blobs-{uuid.uuid4().hex[:12]}/run")
    remote.write_bytes(blob_rel(digest), b"part")
    assert remote.list_blobs() == [digest]
    assert remote.read_bytes(blob_rel(digest)) == b"part"


# ---- where a safetensors file is cut ---------------------------------------------------------------------------
def test_the_header_is_a_part_of_its_own_and_so_is_a_large_tensor():
    data = safetensors.torch.save({"a": torch.zeros(4), "b": torch.ones(300_000)})
    parts = parts_of(data)
    (hlen,) = struct.unpack("<Q", data[:8])
    assert parts[0] == (0, 8 + hlen)  # the header is a part of its own
    assert [n for _, n in parts[1:]] == [16, 1_200_000]
    assert_covers(parts, len(data))


def test_parts_cover_the_file_and_every_cut_falls_on_a_tensor_boundary():
    torch.manual_seed(1)
    sizes = [7, 300_000, 10, 200_000, 100_000, 3, 50_000, 400_000, 1]
    data = safetensors.torch.save({f"t{i:02d}": torch.randn(n) for i, n in enumerate(sizes)})
    parts = parts_of(data)
    assert_covers(parts, len(data))
    bounds = tensor_bounds(data)
    assert all(o in bounds for o, _ in parts[1:]), (parts, sorted(bounds))
    assert all(n < 2 * GROUP_BYTES for _, n in parts), parts  # small tensors grouped, a group closes past GROUP_BYTES
    assert len(parts) < len(sizes)  # small tensors were grouped, not cut one by one


def test_many_small_tensors_become_a_few_parts_not_one_each():
    data = safetensors.torch.save({f"layer{i:03d}.bias": torch.zeros(2048) for i in range(600)})  # 600 x 8 KB
    parts = parts_of(data)
    assert_covers(parts, len(data))
    assert 1 + len(data) // (2 * GROUP_BYTES) <= len(parts) <= 2 + len(data) // GROUP_BYTES


def test_cutting_is_deterministic_and_needs_only_the_header_from_head():
    data = model_file()
    (hlen,) = struct.unpack("<Q", data[:8])
    first = part_ranges(data[: 8 + hlen], len(data))
    assert first == part_ranges(data[: 8 + hlen], len(data)) == parts_of(data) == part_ranges(data, len(data))
    assert digests(data) == digests(bytes(data))


def test_unchanged_tensors_keep_their_digests_and_a_changed_one_changes_only_its_part():
    before, after = model_file(head_scale=0.0), model_file(head_scale=0.5)  # only the head was trained
    assert len(before) == len(after) and before != after
    a, b = digests(before), digests(after)
    assert len(a) == len(b) and a[0] == b[0]  # same header: same shapes and dtypes
    changed = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    assert len(changed) == 1  # the backbone's part (and the other group) travel once only
    o, n = parts_of(after)[changed[0]]
    head = tensor_bounds(after)
    assert o in head and o + n in head


def test_a_tensor_over_chunk_bytes_is_cut_into_fixed_chunks():
    huge_end = 100 + 150 * MiB
    head, size = header_only({"small": (0, 100), "huge": (100, huge_end), "tail": (huge_end, huge_end + 200)})
    parts = part_ranges(head, size)
    assert_covers(parts, size)
    data_start = len(head)
    assert parts[0] == (0, data_start)
    assert parts[1] == (data_start, 100)  # the small tensor before it closes its group
    assert [n for _, n in parts[2:5]] == [CHUNK_BYTES, CHUNK_BYTES, 150 * MiB - 2 * CHUNK_BYTES]
    assert parts[5] == (data_start + 100 + 150 * MiB, 200)


def test_the_files_syncckpt_writes_are_cut_at_their_tensors():
    """Our own safetensors writer pads its header with spaces to 8-byte alignment and orders tensors by width."""
    state = {"w": torch.randn(400_000), "ids": torch.arange(10), "h": torch.randn(8).half()}
    snap = take_snapshot({"model": state}, StagingArena())
    data = b"".join(bytes(c) for c in iter_file_chunks(snap.layouts[0], snap.buffers[0]))
    parts = parts_of(data)
    assert parts[0] == (0, len(snap.layouts[0].header))
    assert_covers(parts, len(data))
    assert all(o in tensor_bounds(data) for o, _ in parts[1:])
    _, tensors = flatten_state(state, "model")
    assert len(plan_layout("model.safetensors", tensors).header) == parts[0][1]


# ---- the fixed-chunk fallback ----------------------------------------------------------------------------------
def test_a_file_that_is_not_safetensors_is_cut_into_fixed_chunks():
    size = 2 * CHUNK_BYTES + 12_345
    parts = part_ranges(b"PK\x03\x04 a zip file, say", size)
    assert parts == [(0, CHUNK_BYTES), (CHUNK_BYTES, CHUNK_BYTES), (2 * CHUNK_BYTES, 12_345)]
    assert part_ranges(b'{"step": 3}', 11) == [(0, 11)]


def test_an_empty_file_is_one_empty_part():
    assert part_ranges(b"", 0) == [(0, 0)]


def test_a_header_that_does_not_fit_in_head_falls_back_to_chunks():
    data = model_file()
    assert part_ranges(data[:64], len(data)) == [(0, len(data))]  # 2.4 MB: one fixed chunk
    assert part_ranges(data[:7], len(data)) == [(0, len(data))]


@pytest.mark.parametrize(
    "tensors, pad",
    [
        ({"a": (0, 16), "b": (32, 48)}, 0),  # a hole between tensors
        ({"a": (0, 16), "b": (8, 24)}, 0),  # overlapping tensors
        ({"a": (0, 16)}, 5),  # bytes after the last tensor
        ({"a": (16, 32)}, 0),  # data section does not start at the first tensor
    ],
    ids=["hole", "overlap", "trailing-bytes", "leading-gap"],
)
def test_a_layout_it_does_not_understand_falls_back_to_chunks(tensors, pad):
    head, size = header_only(tensors, pad)
    assert part_ranges(head, size) == [(0, size)]


def test_a_damaged_header_falls_back_to_chunks():
    for bad in (b"not json", b'{"a": {"dtype": "F32"}}', b'{"a": {"data_offsets": ["x", 1]}}'):
        head = struct.pack("<Q", len(bad)) + bad
        assert part_ranges(head, len(head) + 100) == [(0, len(head) + 100)], bad
    huge_length = struct.pack("<Q", 1 << 40) + b"{}"
    assert part_ranges(huge_length, 1000) == [(0, 1000)]


@pytest.mark.parametrize("header", [b'["list"]', b"null", b"5", b'"s"', b'{"w": 7}', b'{"w": [1, 2]}'])
def test_a_header_that_is_json_but_not_a_safetensors_header_falls_back_to_fixed_chunks(header):
    head = struct.pack("<Q", len(header)) + header
    assert part_ranges(head, len(head) + 100) == [(0, len(head) + 100)]
