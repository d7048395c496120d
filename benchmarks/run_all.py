"""Run every benchmark, one after another (they must not share the machine), and print all their tables.

Each script runs in its own process with its defaults (the 134M-parameter model, ~1.6 GB of state), or with
``--quick`` with small sizes (2 layers, short durations: a smoke test of a few minutes each). Progress lines stream
as the scripts run; the tables are printed again together at the end. Results land in benchmarks/results/*.json.

Usage:  python benchmarks/run_all.py [--quick] [--only overhead,upload] [--skip stall]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent

# name -> (full-size arguments, quick arguments); the script is bench_NAME.py (NAME up to a "+")
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "stall": ([], ["--layers", "2", "--repeat", "3", "--no-dcp"]),
    "overhead": (
        ["--background-nice", "19,0"],
        ["--background-nice", "19,0", "--layers", "2", "--duration", "30", "--every-seconds", "15"],
    ),
    "overhead+isolated": (
        ["--isolate-server", "--background-nice", "19,0"],
        ["--isolate-server", "--background-nice", "19,0", "--layers", "2", "--duration", "30", "--every-seconds", "15"],
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
}


def tables(output: str) -> str:
    """The part of a script's output from its first table on (print_table starts with a blank line)."""
    lines = output.splitlines()
    start = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    return "\n".join(line for line in lines[start:] if not line.startswith("wrote "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--only", default="", help="comma-separated benchmark names")
    ap.add_argument("--skip", default="", help="comma-separated benchmark names")
    args = ap.parse_args()
    names = [n for n in (args.only.split(",") if args.only else BENCHMARKS) if n not in args.skip.split(",")]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmarks {unknown}; choose from {sorted(BENCHMARKS)}")

    collected, failed = [], []
    for name in names:
        script = HERE / f"bench_{name.split('+')[0]}.py"
        cmd = [sys.executable, str(script), *BENCHMARKS[name][1 if args.quick else 0]]
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

    print("\n\n######## All tables ########")
    for name, rc, text in collected:
        print(f"\n--- {name}{'' if rc == 0 else f' (FAILED, exit {rc})'}")
        print(text)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
