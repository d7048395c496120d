"""Content-addressed parts for incremental mirroring: unchanged tensors are not uploaded again.

A safetensors file is cut at tensor boundaries (its header is one part; consecutive small tensors are grouped up
to ``GROUP_BYTES`` so a 100M-parameter model is a few hundred parts, not thousands). Each part is stored once
under ``<run>/blobs/<sha256>``; a remote manifest lists, per file, the parts whose concatenation is the file. A
frozen backbone, embedding tables or untouched LoRA base weights keep their digests from one checkpoint to the
next, so only the changed tensors (and a few KB of metadata) travel.

>>> import torch, safetensors.torch as st
>>> data = st.save({"a": torch.zeros(4), "b": torch.ones(300_000)})
>>> [size for _, size in part_ranges(data[:4096], len(data))][1:]
[16, 1200000]
"""

from __future__ import annotations

import json
import struct

BLOB_DIR = "blobs"
GROUP_BYTES = 1 << 20
CHUNK_BYTES = 64 << 20  # non-safetensors files (and huge tensors) are cut into fixed chunks


def blob_rel(digest: str) -> str:
    """Relative path of a blob under the run prefix."""
    return f"{BLOB_DIR}/{digest}"


def part_ranges(head: bytes, size: int) -> list[tuple[int, int]]:
    """(offset, size) of each part of a file of ``size`` bytes whose first bytes are ``head``.

    Falls back to fixed chunks when the file is not a safetensors file or its header does not fit in ``head``.
    """
    bounds = _tensor_bounds(head, size)
    if bounds is None:
        return _chunks(0, size)
    header_end, tensors = bounds
    parts = [(0, header_end)]
    start = cur = header_end
    for begin, end in tensors:
        begin, end = header_end + begin, header_end + end
        if begin != cur:  # holes or overlaps: not a layout we cut by tensor
            return _chunks(0, size)
        if end - begin >= GROUP_BYTES:
            if cur > start:
                parts.append((start, cur - start))
            parts.extend(_chunks(begin, end - begin))
            start = end
        elif end - start >= GROUP_BYTES:
            parts.append((start, end - start))
            start = end
        cur = end
    if cur != size:
        return _chunks(0, size)
    if cur > start:
        parts.append((start, cur - start))
    return parts


def _tensor_bounds(head: bytes, size: int) -> tuple[int, list[tuple[int, int]]] | None:
    if len(head) < 8:
        return None
    (hlen,) = struct.unpack("<Q", head[:8])
    if 8 + hlen > min(len(head), size):
        return None
    try:
        header = json.loads(head[8 : 8 + hlen])
        if not isinstance(header, dict):  # valid JSON but not a header (a list, null, a number): fixed chunks
            return None
        spans = sorted(
            (int(v["data_offsets"][0]), int(v["data_offsets"][1])) for k, v in header.items() if k != "__metadata__"
        )
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):  # AttributeError: an entry not a dict
        return None
    return 8 + hlen, spans


def _chunks(offset: int, length: int) -> list[tuple[int, int]]:
    if length == 0:
        return [(offset, 0)] if offset == 0 else []
    return [(o, min(CHUNK_BYTES, offset + length - o)) for o in range(offset, offset + length, CHUNK_BYTES)]
