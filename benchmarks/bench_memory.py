"""How much extra host memory does an asynchronous save take, compared with the size of the state?

Each method runs in a fresh child process (so allocator caches and earlier arms do not blur the numbers): build
the model + AdamW state, note the resident set (RSS), reset the kernel's peak-RSS counter (``/proc/self/clear_refs``
= 5), then ``save()`` + ``wait()`` and read the peak (``VmHWM``); then the same for a second save. Reported:

  * first save: peak RSS over the training process without checkpointing (allocating the staging buffers),
  * steady state: the same for the second save, after a training step (staging buffers reused; they stay
    allocated between saves, so they count here too),
  * retained: RSS left allocated after the save finished (the staging buffers).

Methods: local only; local + mirror to moto S3 (a separate process, not counted); local + incremental mirror to
moto S3. Target: peak extra <= 1.2 x the state's size.

Usage:  python benchmarks/bench_memory.py [--layers 12] [--methods local,s3,s3-incremental]
Writes benchmarks/results/memory.json and prints a table.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    BUCKET,
    build_model,
    make_tokens,
    moto_s3,
    n_params,
    print_table,
    state_bytes,
    train_step,
    write_json,
)

METHODS = {
    "local": "local save only",
    "s3": "save + mirror to moto S3",
    "s3-incremental": "save + incremental mirror to moto S3",
}


def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def child(method: str, layers: int, endpoint: str | None, directory: str) -> dict:
    from syncckpt import CheckpointManager

    model, opt = build_model(layers=layers)
    nbytes = state_bytes(model, opt)
    remote, options = None, None
    if method != "local":
        sys.path.insert(0, str(Path(__file__).parent))
        from common import servers_module

        remote = f"s3://{BUCKET}/memory-{method}-{Path(directory).name}"
        options = servers_module().s3_options(endpoint)
        options["config_kwargs"] = {"read_timeout": 900}
    mgr = CheckpointManager(
        directory,
        save_every_n_steps=None,
        keep_last=1,
        remote=remote,
        storage_options=options,
        on_upload_error="raise",
        handle_sigterm=False,
        incremental=method == "s3-incremental",
    )
    mgr.register(model=model, optimizer=opt)
    tokens = make_tokens(vocab=model[-1].out_features)
    for _ in range(3):  # the training process's own footprint (activations, grads, allocator caches) is the baseline
        train_step(model, opt, tokens)
    gc.collect()
    base = _status()["VmRSS"]
    out = {"method": method, "params": n_params(model), "state_bytes": nbytes, "baseline_rss": base, "saves": []}
    for step in (1, 2):
        if step > 1:
            train_step(model, opt, tokens)  # every tensor changes, as between two real checkpoints
        gc.collect()
        before = _status()["VmRSS"]
        _reset_peak()
        mgr.save(step, epoch=0, batch_idx=step - 1)
        if not mgr.wait():
            raise RuntimeError("save did not finish")
        st = _status()
        out["saves"].append({"rss_before": before, "peak": st["VmHWM"], "rss_after": st["VmRSS"]})
    mgr.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.layers, args.endpoint, args.dir)), flush=True)
        return

    methods = args.methods.split(",")
    results = []
    root = Path(tempfile.mkdtemp(prefix="syncckpt-bench-"))
    try:
        with moto_s3() as s3:
            for i, method in enumerate(methods):
                cmd = [
                    sys.executable,
                    __file__,
                    "--child",
                    method,
                    "--layers",
                    str(args.layers),
                    "--endpoint",
                    s3.endpoint_url,
                    "--dir",
                    str(root / f"{method}-{i}"),
                ]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode != 0 or not lines:
                    raise RuntimeError(f"{method}: child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                results.append(json.loads(lines[-1][len("RESULT ") :]))
                shutil.rmtree(root / f"{method}-{i}", ignore_errors=True)
                print(f"  {method} done", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    for r in results:
        nbytes, base = r["state_bytes"], r["baseline_rss"]
        for label, s in zip(("first save", "steady state (2nd save)"), r["saves"], strict=True):
            rows.append(
                {
                    "method": METHODS[r["method"]],
                    "save": label,
                    "state_GB": nbytes / 1e9,
                    "peak_extra_GB": (s["peak"] - base) / 1e9,
                    "retained_GB": (s["rss_after"] - base) / 1e9,
                    "transient_GB": max(0, s["peak"] - s["rss_before"]) / 1e9,
                    "x_state": (s["peak"] - base) / nbytes,
                }
            )
    r0 = results[0]
    title = (
        f"Peak extra host memory (RSS over the training process without checkpointing) during an async save: "
        f"{r0['params'] / 1e6:.0f}M params + AdamW = {r0['state_bytes'] / 1e9:.2f} GB of state; target "
        f"x_state <= 1.2"
    )
    print_table(title, rows, ["method", "save", "state_GB", "peak_extra_GB", "retained_GB", "transient_GB", "x_state"])
    path = write_json("memory", {"rows": rows, "raw": results})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
