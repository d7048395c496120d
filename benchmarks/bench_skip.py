"""How long does a resumed pass take to skip 1M trained samples before its first batch?

Each method resumes a pass whose first ``--skip`` samples were trained and is timed from the restore (its
``load_state_dict``, or building the skipping loader) to the first batch of the rest; every method is checked to
deliver the sample the uninterrupted pass delivers there.

  * map-style, ResumableSampler: a TensorDataset of ``--samples`` rows; the sampler slices the skipped indices off
    the epoch's order (no sample is loaded),
  * ``accelerate.skip_first_batches`` on the same map-style DataLoader (a shuffling RandomSampler): it drops the
    first batches of indices (no sample is loaded either),
  * streamed with state: a Hugging Face ``IterableDataset`` (``from_generator`` over 100 shards) in a
    StatefulDataLoader, restored from the loader's ``state_dict()`` taken after the skipped samples: it reopens
    the shard it was in and skips within that shard only,
  * the count fallback: :class:`syncckpt.data.ResumableLoader` over the same stream without its state (a plain
    IterableDataset): every skipped batch is read and dropped,
  * ``accelerate.skip_first_batches`` on that same plain stream: it also reads and drops every skipped batch.

Usage:  python benchmarks/bench_skip.py [--samples 1048576] [--skip 1000000] [--batch 64]
Writes benchmarks/results/skip.json and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import print_table, write_json  # noqa: E402

from syncckpt import ResumableSampler  # noqa: E402
from syncckpt.data import ResumableLoader  # noqa: E402

SHARDS = 100


def rows(shards: list[int], per: int):
    for s in shards:
        for i in range(s * per, (s + 1) * per):
            yield {"idx": i, "x": float(i)}


class WithoutState(IterableDataset):
    """The same stream with its state hidden: what a plain IterableDataset gives the loaders."""

    def __init__(self, stream) -> None:
        self.stream = stream

    def __iter__(self):
        return iter(self.stream)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _first_idx(batch) -> int:
    if isinstance(batch, dict):
        return int(batch["idx"][0])
    return int(batch[0][0])


def bench_map(n: int, skip: int, batch: int) -> list[dict]:
    ds = TensorDataset(torch.arange(n))
    out = []
    ref = ResumableSampler(ds, batch_size=batch, seed=0)
    ref.set_epoch(0)
    expected = list(ref)[skip // batch * batch]

    def ours():
        s = ResumableSampler(ds, batch_size=batch, seed=0)
        s.load_state_dict({**s.state_dict(), "position": {"epoch": 0, "batch_idx": skip // batch - 1}})
        s.set_epoch(0)
        return next(iter(DataLoader(ds, batch_size=batch, sampler=s)))

    secs, first = _timed(ours)
    out.append({"method": "map-style, ResumableSampler", "skip_s": secs, "first_ok": _first_idx(first) == expected})

    from accelerate import skip_first_batches

    def accel():
        loader = DataLoader(ds, batch_size=batch, sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)))
        return next(iter(skip_first_batches(loader, num_batches=skip // batch)))

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    secs, first = _timed(accel)
    out.append(
        {
            "method": "map-style, accelerate.skip_first_batches",
            "skip_s": secs,
            "first_ok": _first_idx(first) == perm[skip // batch * batch],
        }
    )
    return out


def bench_stream(n: int, skip: int, batch: int) -> list[dict]:
    import datasets
    from accelerate import skip_first_batches
    from torchdata.stateful_dataloader import StatefulDataLoader

    datasets.disable_progress_bars()
    per = n // SHARDS

    def stream():
        return datasets.IterableDataset.from_generator(rows, gen_kwargs={"shards": list(range(SHARDS)), "per": per})

    loader = StatefulDataLoader(stream(), batch_size=batch)
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(skip // batch):
        next(it)
    read_s = time.perf_counter() - t0
    state = loader.state_dict()
    expected = skip // batch * batch

    def with_state():
        fresh = StatefulDataLoader(stream(), batch_size=batch)
        fresh.load_state_dict(state)
        return next(iter(fresh))

    out = []
    secs, first = _timed(with_state)
    out.append(
        {
            "method": "streamed, with state (HF + StatefulDataLoader)",
            "skip_s": secs,
            "first_ok": _first_idx(first) == expected,
        }
    )

    def count():
        fresh = ResumableLoader(DataLoader(WithoutState(stream()), batch_size=batch), progress=False)
        fresh.load_state_dict({"skip_by_count": True, "position": {"epoch": 0, "batch_idx": skip // batch - 1}})
        return next(iter(fresh))

    secs, first = _timed(count)
    out.append(
        {
            "method": "streamed, count fallback (ResumableLoader)",
            "skip_s": secs,
            "first_ok": _first_idx(first) == expected,
        }
    )

    def accel():
        return next(
            iter(skip_first_batches(DataLoader(WithoutState(stream()), batch_size=batch), num_batches=skip // batch))
        )

    secs, first = _timed(accel)
    out.append(
        {"method": "streamed, accelerate.skip_first_batches", "skip_s": secs, "first_ok": _first_idx(first) == expected}
    )
    out.append({"method": "(reading the skipped samples once, for scale)", "skip_s": read_s, "first_ok": None})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=1 << 20)
    p.add_argument("--skip", type=int, default=1_000_000)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    if args.skip >= args.samples:
        p.error("--skip must be below --samples")
    args.skip -= args.skip % args.batch  # whole batches
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    rows_out = bench_map(args.samples, args.skip, args.batch) + bench_stream(args.samples, args.skip, args.batch)
    title = f"Skip {args.skip:,} trained samples of {args.samples:,} (batch {args.batch}): restore -> first batch"
    print_table(title, rows_out, ["method", "skip_s", "first_ok"])
    path = write_json("skip", {"samples": args.samples, "skip": args.skip, "batch": args.batch, "results": rows_out})
    print(f"\nwrote {path}")
    return 0 if all(r["first_ok"] is not False for r in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
