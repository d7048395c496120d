"""How long from ``resume()`` in a fresh session to the first training step, compared with a plain download?

One checkpoint of the benchmark model (model + AdamW state) is committed locally and mirrored to moto S3 (a child
process) with syncckpt's commit. Then, alternating, ``--repeat`` times each:

  * syncckpt: a new ``CheckpointManager`` on a fresh, empty local folder with the S3 remote; the time of
    ``resume()`` (list the run, read manifests, download with SHA-256 verified while streaming, fsync, atomic
    rename, restore model + optimizer + RNG in place): when it returns, the first training step can start.
    Setting the manager up (a lease write) is shown separately,
  * plain download: ``s3fs.get`` of the same files with default settings into a fresh folder (bytes on disk,
    nothing loaded, nothing verified).

Target: resume() <= 1.15 x the plain download (median of the repeats). After the last resume, one training step
runs and the restored tensors are compared with the saved ones.

Usage:  python benchmarks/bench_resume.py [--layers 12] [--repeat 3]
Writes benchmarks/results/resume.json and prints a table.
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

import fsspec
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    build_model,
    committed_checkpoint,
    cpu_seconds,
    make_tokens,
    moto_s3,
    print_table,
    ratio,
    summary,
    train_step,
    unique_prefix,
    write_json,
)

from syncckpt import CheckpointManager  # noqa: E402
from syncckpt.local import read_manifest  # noqa: E402
from syncckpt.manifest import MANIFEST_NAME, Latest, sha256_hex  # noqa: E402
from syncckpt.remote import open_remote  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    root = Path(tempfile.mkdtemp(prefix="syncckpt-bench-"))
    times: dict[str, list[float]] = {"resume": [], "get": []}
    cpu: dict[str, list[float]] = {"resume": [], "get": []}
    setup: list[float] = []
    try:
        folder, info = committed_checkpoint(root / "src", args.layers)
        name = folder.name
        with moto_s3() as s3:
            options = s3.options()
            url = unique_prefix("s3", "resume")
            manifest, _ = read_manifest(folder)
            manifest_bytes = (folder / MANIFEST_NAME).read_bytes()
            remote = open_remote(url, options)
            remote.commit_checkpoint(
                name, folder, manifest, manifest_bytes, Latest(name, manifest.global_step, sha256_hex(manifest_bytes))
            )
            remote.close()
            files = [e.path for e in manifest.files] + [MANIFEST_NAME]

            model, opt = build_model(layers=args.layers)
            for rep in range(args.repeat):
                for arm in ("resume", "get") if rep % 2 == 0 else ("get", "resume"):
                    dest = root / f"{arm}-{rep}"
                    c0 = cpu_seconds()
                    if arm == "get":
                        fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
                        dest.mkdir()
                        t0 = time.perf_counter()
                        fs.get([f"{url}/{name}/{f}" for f in files], [str(dest / f) for f in files])
                        elapsed = time.perf_counter() - t0
                    else:
                        t0 = time.perf_counter()
                        mgr = CheckpointManager(
                            dest, save_every_n_steps=None, remote=url, storage_options=options, handle_sigterm=False
                        )
                        mgr.register(model=model, optimizer=opt)
                        t1 = time.perf_counter()
                        resumed = mgr.resume()
                        elapsed = time.perf_counter() - t1
                        setup.append(t1 - t0)
                        mgr.close()
                        if resumed is None or resumed.name != name:
                            raise RuntimeError(f"resume() found {resumed}, expected {name}")
                    cpu[arm].append(cpu_seconds() - c0)
                    times[arm].append(elapsed)
                    print(f"  {arm:6s} {elapsed:7.2f}s", flush=True)
                    if not (arm == "resume" and rep == args.repeat - 1):
                        shutil.rmtree(dest)

            # The last resumed state is the saved one, and it trains.
            saved = load_file(folder / "model.safetensors")
            live = model.state_dict()
            same = all(torch.equal(live[k], saved[k]) for k in live)
            saved_opt = load_file(folder / "optimizer.safetensors")
            same_opt = all(
                torch.equal(v, saved_opt[f"state.{i}.{k}"])
                for i, st in opt.state_dict()["state"].items()
                for k, v in st.items()
                if isinstance(v, torch.Tensor)
            )
            t0 = time.perf_counter()
            loss = train_step(model, opt, make_tokens(vocab=model[-1].out_features))
            first_step = time.perf_counter() - t0
    finally:
        shutil.rmtree(root, ignore_errors=True)

    base = statistics.median(times["get"])
    rows = []
    for arm, label in (("get", "plain s3fs get (download only)"), ("resume", "syncckpt resume() (fresh dir)")):
        s = summary(times[arm])
        rows.append(
            {
                "method": label,
                **s,
                "MB_per_s": info["bytes"] / s["median_s"] / 1e6,
                "cpu_s": statistics.median(cpu[arm]),
                "x_plain_get": ratio(s["median_s"], base),
            }
        )
    title = (
        f"Fresh-session resume from moto S3: {info['bytes'] / 1e9:.2f} GB checkpoint ({info['params'] / 1e6:.0f}M "
        f"params + AdamW), median of {args.repeat}, alternating; target x_plain_get <= 1.15"
    )
    print_table(title, rows, ["method", "median_s", "min_s", "max_s", "n", "MB_per_s", "cpu_s", "x_plain_get"])
    print(
        f"\nmanager setup before resume(): median {statistics.median(setup):.2f}s; first training step after "
        f"resume: {first_step:.2f}s (loss {loss:.3f}); restored model identical: {same}, optimizer identical: "
        f"{same_opt}"
    )
    path = write_json(
        "resume",
        {
            **info,
            "rows": rows,
            "samples": times,
            "setup_s": setup,
            "first_step_s": first_step,
            "restored_identical": same and same_opt,
        },
    )
    print(f"\nwrote {path}")
    if not (same and same_opt):
        sys.exit("restored state differs from the saved one")


if __name__ == "__main__":
    main()
