"""The manifest: round trip, hostile input refused with the right error class, LATEST parsing, digest checks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from syncckpt.errors import CheckpointCorrupt, UnsafeCheckpoint, UnsupportedFormat
from syncckpt.manifest import (
    MAX_FILE_SIZE,
    FileEntry,
    Latest,
    Manifest,
    json_safe_metrics,
    sha256_hex,
    verify_digest,
)

DIGEST = sha256_hex(b"abc")


def good_dict() -> dict[str, Any]:
    """A valid manifest as plain JSON data, for tests to damage one field at a time."""
    m = Manifest(
        name="checkpoint-step-10",
        kind="step",
        global_step=10,
        epoch=1,
        batch_idx=4,
        files=[FileEntry("model.safetensors", 3, DIGEST), FileEntry("state.json", 2, sha256_hex(b"{}"))],
    )
    return json.loads(m.to_bytes())


def encode(raw: Any) -> bytes:
    return json.dumps(raw).encode()


def with_file(**changes: Any) -> bytes:
    raw = good_dict()
    raw["files"][0].update(changes)
    return encode(raw)


def refused(data: bytes, cls: type[Exception]) -> str:
    """Parse ``data``, expect exactly ``cls`` and return the message (which names the manifest)."""
    with pytest.raises(CheckpointCorrupt) as info:
        Manifest.from_bytes(data, where="run/checkpoint-step-10/manifest.json")
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    message = str(info.value)
    assert "run/checkpoint-step-10/manifest.json" in message
    return message


# ---- round trip ----------------------------------------------------------------------------------------------


def test_round_trip_keeps_every_field():
    m = Manifest(
        name="checkpoint-epoch-3",
        kind="epoch",
        global_step=1234,
        epoch=3,
        batch_idx=-1,
        files=[FileEntry("model.safetensors", 3, DIGEST), FileEntry("sub/state.json", 0, sha256_hex(b""))],
        healthy=False,
        unhealthy_tensors=["model/w"],
        metrics={"acc": 0.5, "name": "x", "n": None},
        created=1700000000.25,
        versions={"torch": "2.13"},
        world_size=4,
        extra={"best_metric": 0.5},
    )
    back = Manifest.from_bytes(m.to_bytes())
    assert back == m
    assert back.total_size == 3
    assert back.file("sub/state.json").size == 0


def test_to_bytes_is_strict_json_with_an_iso_timestamp():
    raw = json.loads(Manifest("best_model", "best", 5, 0, -1, [FileEntry("a.json", 3, DIGEST)], created=0).to_bytes())
    assert raw["created_iso"] == "1970-01-01T00:00:00Z"
    assert raw["format"] == "syncckpt" and raw["format_version"] == 1


@pytest.mark.parametrize(
    "name,kind", [("checkpoint-epoch-2", "epoch"), ("best_model", "best"), ("checkpoint-10", "step")]
)
def test_other_kinds_round_trip(name, kind):
    raw = good_dict()
    raw.update(name=name, kind=kind)
    assert Manifest.from_bytes(encode(raw)).kind == kind


# ---- hostile manifests -----------------------------------------------------------------------------------------


def test_not_json_is_corrupt():
    assert "not valid JSON" in refused(b"{not json", CheckpointCorrupt)


def test_not_utf8_is_corrupt():
    assert "not valid JSON" in refused(b"\xff\xfe{}", CheckpointCorrupt)


@pytest.mark.parametrize("data", [b"[1, 2]", b"42", b'"manifest"', b"null"])
def test_not_an_object_is_corrupt(data):
    assert "expected a JSON object" in refused(data, CheckpointCorrupt)


@pytest.mark.parametrize("version", [2, 0, "1", None, True])
def test_unknown_format_version_is_unsupported(version):
    raw = good_dict()
    raw["format_version"] = version
    message = refused(encode(raw), UnsupportedFormat)
    assert f"format_version {version!r}" in message and "upgrade" in message


def test_foreign_format_is_unsupported():
    raw = good_dict()
    raw["format"] = "orbax"
    assert "'orbax'" in refused(encode(raw), UnsupportedFormat)


@pytest.mark.parametrize(
    "path",
    ["../x", "/etc/passwd", "a/../../b", "a\\b", "..\\x", "a\x00b", "C:/x", "./a", "a//b", ".hidden", "a/./b", ""],
)
def test_path_escapes_are_unsafe(path):
    message = refused(with_file(path=path), UnsafeCheckpoint)
    assert repr(path) in message


def test_path_that_is_not_a_string_is_unsafe():
    refused(with_file(path=["model.safetensors"]), UnsafeCheckpoint)


@pytest.mark.parametrize("size", [MAX_FILE_SIZE + 1, 2**60, 10**20])
def test_absurd_size_is_unsafe(size):
    message = refused(with_file(size=size), UnsafeCheckpoint)
    assert "model.safetensors" in message and "1 TiB" in message


@pytest.mark.parametrize("size", [-1, 1.5, "3", None, True])
def test_bad_size_is_corrupt(size):
    message = refused(with_file(size=size), CheckpointCorrupt)
    assert "model.safetensors" in message and f"size {size!r}" in message


@pytest.mark.parametrize("digest", ["xyz", DIGEST.upper(), DIGEST[:-1], DIGEST + "0", None, 5, "g" * 64])
def test_bad_digest_is_corrupt(digest):
    message = refused(with_file(sha256=digest), CheckpointCorrupt)
    assert "model.safetensors" in message and "sha256" in message


def test_duplicate_paths_are_corrupt():
    raw = good_dict()
    raw["files"].append(dict(raw["files"][0]))
    assert "listed twice" in refused(encode(raw), CheckpointCorrupt)


def test_a_file_entry_shadowing_the_manifest_is_corrupt():
    assert "shadows the manifest" in refused(with_file(path="manifest.json"), CheckpointCorrupt)


@pytest.mark.parametrize(
    "name,kind",
    [
        ("checkpoint-step-10", "epoch"),
        ("best_model", "step"),
        ("checkpoint-epoch-1", "best"),
        ("checkpoint-step-10", "weird"),
        ("../checkpoint-step-10", "step"),
        ("data", "step"),
    ],
)
def test_name_kind_mismatch_is_corrupt(name, kind):
    raw = good_dict()
    raw.update(name=name, kind=kind)
    message = refused(encode(raw), CheckpointCorrupt)
    assert repr(name) in message and repr(kind) in message


def test_step_folder_disagreeing_with_global_step_is_corrupt():
    raw = good_dict()
    raw["global_step"] = 11
    assert "does not match global_step 11" in refused(encode(raw), CheckpointCorrupt)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["created", "metrics"])
def test_non_standard_json_constants_are_corrupt(constant, field):
    text = json.dumps(good_dict())
    if field == "created":
        raw = good_dict()
        raw["created"] = 12345.0
        text = json.dumps(raw).replace("12345.0", constant)
    else:
        text = text.replace('"metrics": {}', f'"metrics": {{"loss": {constant}}}')
    assert constant in text
    message = refused(text.encode(), CheckpointCorrupt)
    assert f"non-standard JSON constant {constant}" in message


@pytest.mark.parametrize(
    "field,number",
    [("created", "1e400"), ("created", "-1e400"), ("created", "1" + "0" * 400), ("metrics", "1e400")],
    ids=["created-1e400", "created-minus-1e400", "created-400-digit-int", "metrics-1e400"],
)
def test_overflowing_numbers_are_corrupt(field, number):
    # 1e400 is valid JSON syntax that decodes to inf (which to_bytes cannot write back), and float() of a 400-digit
    # integer raises OverflowError: both must be refused like NaN, not accepted or leaked as OverflowError.
    raw = good_dict()
    raw["created"] = 12345.0
    text = json.dumps(raw)
    if field == "created":
        text = text.replace("12345.0", number)
    else:
        text = text.replace('"metrics": {}', f'"metrics": {{"loss": {number}}}')
    refused(text.encode(), CheckpointCorrupt)


@pytest.mark.parametrize(
    "key,value",
    [
        ("global_step", "10"),
        ("epoch", -1),
        ("batch_idx", -2),
        ("files", []),
        ("files", "model.safetensors"),
        ("files", ["model.safetensors"]),
        ("healthy", "yes"),
        ("world_size", 0),
        ("metrics", [1]),
        ("unhealthy_tensors", "w"),
        ("created", "today"),
        ("name", None),
    ],
)
def test_wrong_field_types_are_corrupt(key, value):
    raw = good_dict()
    raw[key] = value
    refused(encode(raw), CheckpointCorrupt)


def test_file_parts_round_trip():
    parts = ((1, sha256_hex(b"a")), (2, sha256_hex(b"bc")))
    m = Manifest("checkpoint-step-1", "step", 1, 0, -1, [FileEntry("model.safetensors", 3, DIGEST, parts)])
    assert Manifest.from_bytes(m.to_bytes()).files[0].parts == parts
    assert "parts" not in json.loads(Manifest.from_bytes(encode(good_dict())).to_bytes())["files"][0]


@pytest.mark.parametrize(
    "parts",
    [
        {"a": 1},
        [[3]],
        [[3, DIGEST, 1]],
        [["3", DIGEST]],
        [[True, DIGEST]],
        [[-1, DIGEST], [4, DIGEST]],
        [[3, "xyz"]],
        [[1, DIGEST], [1, DIGEST]],
        [[MAX_FILE_SIZE + 1, DIGEST]],
    ],
)
def test_bad_file_parts_are_corrupt(parts):
    assert "model.safetensors" in refused(with_file(parts=parts), CheckpointCorrupt)


def test_oversized_manifest_is_unsafe():
    raw = good_dict()
    raw["extra"] = {"pad": "x" * (5 * 1024 * 1024)}
    assert "far too large" in refused(encode(raw), UnsafeCheckpoint)


def test_too_many_files_is_unsafe():
    raw = good_dict()
    raw["files"] = [{"path": f"f{i}", "size": 0, "sha256": DIGEST} for i in range(10_001)]
    assert "10001 files" in refused(encode(raw), UnsafeCheckpoint)


def test_deeply_nested_json_is_corrupt_not_a_recursion_error():
    # A hostile manifest (well under the 4 MiB ceiling) must fail with CheckpointCorrupt like any other damage,
    # not with a RecursionError out of the JSON decoder.
    refused(b"[" * 100_000 + b"]" * 100_000, CheckpointCorrupt)


# ---- LATEST ----------------------------------------------------------------------------------------------------


def test_latest_round_trip():
    latest = Latest("checkpoint-epoch-2", 77, DIGEST)
    assert Latest.from_bytes(latest.to_bytes()) == latest


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage",
        b"\xff\xfe",
        b"[]",
        b"null",
        b"42",
        b'{"name": "checkpoint-step-5"}',
        b'{"name": "checkpoint-step-5", "global_step": "five", "manifest_sha256": "' + DIGEST.encode() + b'"}',
        b'{"name": "checkpoint-step-5", "global_step": [5], "manifest_sha256": "' + DIGEST.encode() + b'"}',
        b'{"name": "checkpoint-step-5", "global_step": NaN, "manifest_sha256": "' + DIGEST.encode() + b'"}',
        b'{"name": "../etc", "global_step": 5, "manifest_sha256": "' + DIGEST.encode() + b'"}',
        b'{"name": "checkpoint-step-5", "global_step": 5, "manifest_sha256": "abc"}',
        b'{"name": "checkpoint-step-5", "global_step": 5, "manifest_sha256": "' + DIGEST.upper().encode() + b'"}',
    ],
)
def test_damaged_latest_is_none(data):
    assert Latest.from_bytes(data) is None


@pytest.mark.parametrize("step", [b"1e400", b"Infinity", b"-Infinity"])
def test_latest_with_an_infinite_step_is_none(step):
    # int(float('inf')) raises OverflowError, which LATEST parsing must treat as damage like any other.
    data = b'{"name": "checkpoint-step-5", "global_step": ' + step + b', "manifest_sha256": "' + DIGEST.encode() + b'"}'
    assert Latest.from_bytes(data) is None


def test_deeply_nested_latest_is_none():
    assert Latest.from_bytes(b"[" * 100_000) is None


# ---- verification ----------------------------------------------------------------------------------------------


def test_verify_accepts_matching_bytes():
    entry = FileEntry("model.safetensors", 3, DIGEST)
    verify_digest(entry, 3, DIGEST)


def test_verify_size_mismatch_names_the_file():
    with pytest.raises(CheckpointCorrupt, match=r"^optimizer\.safetensors: size 2 bytes, manifest says 3"):
        verify_digest(FileEntry("optimizer.safetensors", 3, DIGEST), 2, DIGEST)


def test_verify_digest_mismatch_names_the_file():
    with pytest.raises(CheckpointCorrupt, match=r"^sub/state\.json: SHA-256 mismatch"):
        verify_digest(FileEntry("sub/state.json", 3, DIGEST), 3, sha256_hex(b"abd"))


def test_json_safe_metrics_turns_odd_values_into_json_scalars():
    import numpy as np
    import torch

    out = json_safe_metrics({"a": torch.tensor(0.5), "b": np.float32(2.0), "c": float("nan"), "d": [1], "e": 3})
    assert out == {"a": 0.5, "b": 2.0, "c": None, "d": "[1]", "e": 3}
    json.dumps(out, allow_nan=False)
