"""Run benchmarks one after another (they must not share the machine) and print all their tables.

Without options: every figure of issue 19's table in one run, about 12 minutes on 2 cores: the fair stall benchmark,
the peers benchmark (DCP, torch.save + put, syncckpt against the same moto S3) at a small size, once sharing the
CPUs with the store and once with the store on a core of its own, and the training speed with a checkpoint every 30
s (store on its own core, both peers in the same rounds, the 2-layer model); ``--size M`` sets the state of the
first three (M million parameters of a Linear stack, 12 bytes of fp32 + AdamW state each). ``--all``: every
benchmark with its defaults (the 134M-parameter model, ~1.6 GB of state; about 1 h 15 min on 2 cores), ``--all
--quick`` with small sizes (2 layers, short durations). Progress lines stream as the scripts run; the tables are
printed again together at the end. Results land in benchmarks/results/*.json (and the combined output in
benchmarks/results/run_all.txt).

Usage:  python benchmarks/run_all.py [--size 16] [--all [--quick]] [--only overhead,upload] [--skip stall]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# name -> (full-size arguments, quick arguments); the script is bench_NAME.py (NAME up to a "+")
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "stall": ([], ["--layers", "2", "--repeat", "3", "--no-dcp"]),
    "peers": (["--size", "134"], ["--size", "4", "--repeat", "2"]),
    "overhead": (
        ["--background-nice", "19,0"],
        ["--background-nice", "19,0", "--layers", "2", "--duration", "30", "--every-seconds", "15"],
    ),
    # the store on a core of its own; the peers (DCP async_save, torch.save + put) in the same rounds
    "overhead+isolated": (
        ["--isolate-server", "--peers"],
        ["--isolate-server", "--peers", "--layers", "2", "--duration", "30", "--every-seconds", "15"],
    ),
    "overhead+local": (
        ["--remote", "none", "--background-nice", "19,0", "--duration", "180"],
        ["--remote", "none", "--layers", "2", "--duration", "30", "--every-seconds", "15"],
    ),
    # the write path with a core of its own, as on a GPU machine whose training loop leaves CPU cores idle
    "overhead+local+spare-core": (
        ["--remote", "none", "--isolate-server", "--pin-background", "--background-nice", "19", "--duration", "180"],
        [
            "--remote",
            "none",
            "--isolate-server",
            "--pin-background",
            "--layers",
            "2",
            "--duration",
            "30",
            "--every-seconds",
            "15",
        ],
    ),
    "upload": ([], ["--layers", "2", "--repeat", "2"]),
    "resume": ([], ["--layers", "2", "--repeat", "2"]),
    "memory": ([], ["--layers", "2"]),
    "incremental": ([], ["--layers", "2", "--checkpoints", "3"]),
    "scale": ([], ["--width", "64", "--layers", "2"]),  # 2 nodes x 4 ranks, node-local, requests counted per node
}


# the default run: every figure of issue 19's table, small, about 12 minutes on 2 cores ({size} is --size)
DEFAULT: dict[str, list[str]] = {
    "stall": ["--size", "{size}", "--repeat", "7"],
    "peers": ["--size", "{size}", "--repeat", "3"],
    "peers+isolated": ["--size", "{size}", "--repeat", "5", "--isolate-server"],  # the store on a core of its own
    # training speed, a checkpoint every 30 s, the store on its own core, both peers in the same rounds
    "overhead+isolated": ["--isolate-server", "--peers", "--layers", "2"],
}


def tables(output: str) -> str:
    """The part of a script's output from its first table on (print_table starts with a blank line)."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    return "\n".join(line for line in lines[start:] if not line.startswith("wrote "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=16.0, help="millions of parameters for the default run")
    ap.add_argument("--all", action="store_true", help="every benchmark, full size (with --quick: small)")
    ap.add_argument("--quick", action="store_true", help="with --all: small sizes, a smoke test")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--skip", default="", help="comma-separated benchmark names")
    args = ap.parse_args()
    suite = BENCHMARKS if args.all or args.quick else DEFAULT
    names = [n for n in (args.only.split(",") if args.only else suite) if n not in args.skip.split(",")]
    unknown = [n for n in names if n not in suite]
    if unknown:
        sys.exit(f"unknown benchmarks {unknown}; choose from {sorted(suite)}")

    collected, failed = [], []
    for name in names:
        script = HERE / f"bench_{name.split('+')[0]}.py"
        if suite is DEFAULT:
            extra = [a.format(size=f"{args.size:g}") for a in DEFAULT[name]]
        else:
            extra = BENCHMARKS[name][1 if args.quick else 0]
        cmd = [sys.executable, str(script), *extra]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        out = []
        for line in proc.stdout:  # type: ignore[union-attr]
            print(line, end="", flush=True)
            out.append(line)
        rc = proc.wait()
        print(f"=== {name}: exit {rc} after {time.monotonic() - t0:.0f}s", flush=True)
        if rc != 0:
            failed.append(name)
        collected.append((name, rc, tables("".join(out))))

    report = [f"######## All tables ######## ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at the end)"]
    for name, rc, text in collected:
        report += [f"\n--- {name}{'' if rc == 0 else f' (FAILED, exit {rc})'}", text]
    print("\n\n" + "\n".join(report))
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "run_all.txt").write_text("\n".join(report) + "\n")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
