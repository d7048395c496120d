"""How long does mirroring one committed checkpoint take, compared with a plain fsspec put of the same files?

One local checkpoint of the benchmark model (model + AdamW state) is committed first. Then, per store (moto S3 in
a child process, fake-gcs-server), these methods upload it to a fresh prefix, ``--repeat`` times each, in an
order rotated (and reversed every other round) so that no method always follows the same one, each after the
server went idle (the machine is shared and noisy: only ratios measured side by side mean something):

  * plain put: ``s3fs``/``gcsfs`` ``put`` of the checkpoint's files with default settings (the baseline),
  * ``remote.commit_checkpoint``: syncckpt's commit (parallel upload, size check in the store, manifest.json,
    LATEST),
  * ``Uploader``: what the background thread does per checkpoint (staging hard links, lease check, remote
    retention listing, commit), from ``submit()`` until ``wait()`` returns,
  * ``Uploader(incremental=True)``, first mirror: every tensor blob is new, so all bytes travel.

Target: syncckpt's times <= 1.0 x the plain put (median of the repeats).

Usage:  python benchmarks/bench_upload.py [--layers 12] [--repeat 3] [--stores s3,gcs]
Writes benchmarks/results/upload.json and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    committed_checkpoint,
    cpu_seconds,
    fake_gcs,
    moto_s3,
    print_table,
    ratio,
    summary,
    unique_prefix,
    write_json,
)

from syncckpt.local import read_manifest  # noqa: E402
from syncckpt.manifest import MANIFEST_NAME, Latest, sha256_hex  # noqa: E402
from syncckpt.remote import open_remote  # noqa: E402
from syncckpt.uploader import Uploader  # noqa: E402

METHODS = ["plain put", "commit_checkpoint", "Uploader", "Uploader incremental"]


def plain_fs(scheme: str, options: dict):
    import fsspec

    return fsspec.filesystem(scheme, skip_instance_cache=True, **options)


def upload_once(method: str, scheme: str, options: dict, folder: Path) -> tuple[float, str]:
    """Upload ``folder`` with ``method`` to a fresh prefix; returns the seconds taken and the prefix."""
    url = unique_prefix(scheme, method.replace(" ", "-").lower())
    name = folder.name
    if method == "plain put":
        fs = plain_fs(scheme, options)
        files = sorted(p for p in folder.iterdir() if p.is_file())
        t0 = time.perf_counter()
        fs.put([str(p) for p in files], [f"{url}/{name}/{p.name}" for p in files])
        return time.perf_counter() - t0, url
    manifest, _ = read_manifest(folder)
    manifest_bytes = (folder / MANIFEST_NAME).read_bytes()
    if method == "commit_checkpoint":
        remote = open_remote(url, options)
        try:
            latest = Latest(name, manifest.global_step, sha256_hex(manifest_bytes))
            t0 = time.perf_counter()
            remote.commit_checkpoint(name, folder, manifest, manifest_bytes, latest)
            return time.perf_counter() - t0, url
        finally:
            remote.close()
    up = Uploader(url, options, on_error="raise", incremental=method.endswith("incremental"), retention=lambda refs: [])
    try:
        t0 = time.perf_counter()
        up.submit(folder.parent, manifest)
        up.wait()
        elapsed = time.perf_counter() - t0
        up.raise_if_failed()
        if up.status()["mirrored"] != [name]:
            raise RuntimeError(f"{method}: {name} not mirrored: {up.status()}")
        return elapsed, url
    finally:
        up.close()


def settle(pid: int, quiet: float = 0.05, timeout: float = 30.0) -> None:
    """Wait until the server process is idle (an emulator may still be freeing the last upload's objects)."""
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = cpu_seconds(pid)
        if now - last < quiet:
            return
        last = now


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stores", default="s3,gcs", help="comma-separated: s3, gcs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = Path(tempfile.mkdtemp(prefix="syncckpt-bench-"))
    rows, samples = [], {}
    try:
        folder, info = committed_checkpoint(root / "ckpt", args.layers)
        for store in args.stores.split(","):
            server_cm = moto_s3() if store == "s3" else fake_gcs()
            scheme = "s3" if store == "s3" else "gs"
            with server_cm as server:
                options = server.options()
                server_pid = server.pid if store == "s3" else server._proc.pid
                fs = plain_fs(scheme, options)
                upload_once("plain put", scheme, options, folder)  # warm-up: connections, server code paths
                times: dict[str, list[float]] = {m: [] for m in METHODS}
                cpu: dict[str, list[float]] = {m: [] for m in METHODS}
                for rep in range(args.repeat):
                    # Rotated, and reversed every other round, so no method always follows the same one.
                    order = METHODS[rep % len(METHODS) :] + METHODS[: rep % len(METHODS)]
                    for method in order[::-1] if rep % 2 else order:
                        settle(server_pid)
                        c0 = cpu_seconds()
                        elapsed, url = upload_once(method, scheme, options, folder)
                        cpu[method].append(cpu_seconds() - c0)
                        times[method].append(elapsed)
                        fs.rm(url, recursive=True)  # the emulators keep objects in memory or temp files
                        print(f"  {store} {method:22s} {elapsed:7.2f}s", flush=True)
            base = statistics.median(times["plain put"])
            for method in METHODS:
                s = summary(times[method])
                rows.append(
                    {
                        "store": store,
                        "method": method,
                        **s,
                        "MB_per_s": info["bytes"] / s["median_s"] / 1e6,
                        "client_cpu_s": statistics.median(cpu[method]),
                        "x_plain_put": ratio(s["median_s"], base),
                    }
                )
            samples[store] = times
    finally:
        shutil.rmtree(root, ignore_errors=True)

    title = (
        f"Mirror one checkpoint ({info['files']} files, {info['bytes'] / 1e9:.2f} GB; {info['params'] / 1e6:.0f}M "
        f"params + AdamW), median of {args.repeat}, order rotated + reversed; target x_plain_put <= 1.0"
    )
    print_table(
        title, rows, ["store", "method", "median_s", "min_s", "max_s", "n", "MB_per_s", "client_cpu_s", "x_plain_put"]
    )
    path = write_json("upload", {**info, "rows": rows, "samples": samples})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
