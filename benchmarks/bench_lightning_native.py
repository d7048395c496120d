"""Mid-epoch resume in Lightning: its native checkpointing against SyncCkptIO, in the test suite's setting.

The job (``tests/e2e/lightning_job.py``: shuffle, dropout, accumulate_grad_batches=2, AdamW, warmup LambdaLR,
bf16-mixed, 96 samples in batches of 8, a checkpoint every 2 optimizer steps) is SIGKILLed at optimizer step 5 of
epoch 0 (the step-4 checkpoint is on disk), resumed in a new process from that checkpoint, and compared with an
uninterrupted run of the same kind: are the model and optimizer tensors bit-identical, how many dataset
``__getitem__`` calls does the resumed run make (an uninterrupted run from step 4 on needs 224), and how long from
``fit()`` to the first trained batch (restore + skip).

    python benchmarks/bench_lightning_native.py        # prints a table, writes benchmarks/results/lightning_native.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "e2e" / "lightning_job.py"
sys.path.insert(0, str(JOB.parent))
from procs import run_until  # noqa: E402


def run(args: list[str], stop_line: str | None = None) -> list[str]:
    return run_until([sys.executable, str(JOB), *args], stop_line)[0]  # the test suite's run-and-kill


def value(lines: list[str], prefix: str) -> str:
    return next(ln for ln in lines if ln.startswith(prefix)).split()[-1]


def measure(native: bool, tmp: Path) -> dict[str, object]:
    ck = tmp / ("native" if native else "syncckpt")
    common = ["--dir", str(ck)] + (["--native"] if native else ["--remote", (tmp / "bucket").as_uri()])
    run([*common, "--out", str(tmp / "x.safetensors"), "--hold-at-step", "5"], stop_line="HOLD step 5")
    ckpt = str(ck / "epoch=0-step=4.ckpt") if native else "last"
    out, ref = tmp / "out.safetensors", tmp / "ref.safetensors"
    lines = run([*common, "--out", str(out), "--ckpt-path", ckpt, "--reference-out", str(ref)])
    a, b = load_file(str(out)), load_file(str(ref))
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    return {
        "method": "Lightning native (TorchCheckpointIO, DataLoader(shuffle=True))" if native else "SyncCkptIO",
        "bit_identical": not differ,
        "tensors_differing": len(differ),
        "getitem_calls_after_resume": int(value(lines, "getitem ")),
        "fit_to_first_batch_s": float(value(lines, "first-batch ").rstrip("s")),
        "first_resumed_step": next(ln for ln in lines if ln.startswith("step ")),
    }


def main() -> int:
    with tempfile.TemporaryDirectory() as d:
        rows = [measure(True, Path(d) / "n"), measure(False, Path(d) / "s")]
    for r in rows:
        print(json.dumps(r))
    out = ROOT / "benchmarks" / "results" / "lightning_native.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
