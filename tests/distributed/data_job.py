"""A training job over three data pipelines at once, for the exact-resume tests of :mod:`syncckpt.data` and
:mod:`syncckpt.augment`. Three tiny models train side by side, one on each pipeline, in one loop:

- ``loader``: torchdata's ``StatefulDataLoader`` (shuffle, 2 workers) over a map-style dataset, registered as it is;
- ``stream``: a Hugging Face ``IterableDataset`` streamed from local JSONL shards through :class:`ShuffleBuffer`,
  in a ``StatefulDataLoader`` with 2 workers, registered as it is; every shard open is appended to ``--reads``;
- ``aug``: random crops and noise drawn inside ``--aug-workers`` workers from per-sample generators
  (:class:`PerSampleRandom`) behind a ResumableSampler (registered first: it re-applies the RNG streams once the
  three loaders drew their worker seeds).

Prints ``ids N [...]`` (the stream's sample ids of optimizer step N) and ``step N`` after every step, and writes
every model's and optimizer's tensors and the torch RNG state to ``--out``. The test imports :func:`train` to run
the uninterrupted reference in its own process.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import warnings
from pathlib import Path

import datasets
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from syncckpt import CheckpointManager, ResumableSampler
from syncckpt.augment import PerSampleRandom
from syncckpt.data import ShuffleBuffer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from procs import say  # noqa: E402

N, BATCH, SHARDS = 48, 4, 4


def write_shards(folder: str) -> list[str]:
    """SHARDS JSONL files of N // SHARDS rows each: {"idx": i, "x": 8 floats}, the same bytes every time."""
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, 8, generator=g).tolist()
    paths, per = [], N // SHARDS
    for s in range(SHARDS):
        path = os.path.join(folder, f"shard-{s}.jsonl")
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps({"idx": i, "x": x[i]}) + "\n" for i in range(s * per, (s + 1) * per))
        os.replace(path + ".tmp", path)
        paths.append(path)
    return paths


def read_shards(paths: list[str], reads: str):
    """The stream's generator: one shard file after another, each open logged (one O_APPEND write)."""
    for path in paths:
        fd = os.open(reads, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        os.write(fd, f"open {os.path.basename(path)}\n".encode())
        os.close(fd)
        with open(path) as f:
            for line in f:
                yield json.loads(line)


def collate_stream(batch: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([e["x"] for e in batch]), torch.tensor([e["idx"] for e in batch])


def crop_and_noise(sample: tuple[torch.Tensor, torch.Tensor], g: torch.Generator):
    img, label = sample
    top, left = (int(v) for v in torch.randint(0, 3, (2,), generator=g))
    crop = img[:, top : top + 8, left : left + 8]
    return (crop + 0.1 * torch.randn(crop.shape, generator=g)).flatten(), label


def net(inputs: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(inputs, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2)
    )


def train(
    ckpt_dir: str,
    data_dir: str,
    reads: str,
    aug_workers: int = 2,
    epochs: int = 2,
    hold_at: int | None = None,
    sync_saves: bool = False,
    handle_sigterm: bool = True,
    say=say,
) -> tuple[dict[str, torch.Tensor], int]:
    """The job's training (resumed from ``ckpt_dir`` when it holds a checkpoint): every model's and optimizer's
    tensors and the torch RNG state at the end, and the last global step. ``say`` gets the ``ids`` and ``step``
    lines."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, imgs = torch.randn(N, 6, generator=g), torch.randn(N, 1, 10, 10, generator=g)
    labels = (x[:, 0] > 0).long()
    map_loader = StatefulDataLoader(TensorDataset(x, labels), batch_size=BATCH, shuffle=True, num_workers=2)

    shards = write_shards(data_dir)
    source = datasets.IterableDataset.from_generator(read_shards, gen_kwargs={"paths": shards, "reads": reads})
    stream = ShuffleBuffer(source, buffer_size=8, seed=3)
    stream_loader = StatefulDataLoader(stream, batch_size=BATCH, num_workers=2, collate_fn=collate_stream)

    aug_ds = PerSampleRandom(TensorDataset(imgs, labels), crop_and_noise, seed=9)
    sampler = ResumableSampler(aug_ds, batch_size=BATCH, shuffle=True, seed=4)
    aug_loader = DataLoader(aug_ds, batch_size=BATCH, sampler=sampler, num_workers=aug_workers)

    models = {"loader": net(6), "stream": net(8), "aug": net(64)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-2) for k, m in models.items()}
    mgr = CheckpointManager(
        ckpt_dir, save_every_n_steps=3, keep_last=2, keep_epochs=1, grace_period=30, handle_sigterm=handle_sigterm
    )
    mgr.register(sampler=sampler, loader=map_loader, stream=stream_loader)
    mgr.register(**{f"model_{k}": m for k, m in models.items()}, **{f"opt_{k}": o for k, o in opts.items()})
    info = mgr.resume()
    start_epoch, global_step = (info.epoch, info.global_step) if info else (0, 0)
    for epoch in range(start_epoch, epochs):
        sampler.set_epoch(epoch)
        aug_ds.set_epoch(epoch)
        stream.set_epoch(epoch)
        first = info.batch_idx + 1 if info and epoch == info.epoch else 0
        for batch_idx, batches in enumerate(zip(map_loader, stream_loader, aug_loader, strict=True), start=first):
            for (xb, yb), key in zip(batches, models, strict=True):
                target = yb % 2 if key == "stream" else yb
                loss = torch.nn.functional.cross_entropy(models[key](xb), target)
                loss.backward()
                opts[key].step()
                opts[key].zero_grad(set_to_none=True)
            global_step += 1
            say(f"ids {global_step} {json.dumps(batches[1][1].tolist())}")
            if mgr.step(global_step, epoch=epoch, batch_idx=batch_idx) and sync_saves:
                mgr.wait()
            say(f"step {global_step}")
            if global_step == hold_at:
                threading.Event().wait()  # the killing test reads ahead of nothing: the job stops right here
        mgr.save_epoch(epoch, global_step=global_step)
    mgr.close()
    tensors = {f"{k}.{n}": v.contiguous() for k, m in models.items() for n, v in m.state_dict().items()}
    for k, o in opts.items():
        for pid, st in o.state_dict()["state"].items():
            for n, v in st.items():
                tensors[f"opt_{k}.{pid}.{n}"] = v.reshape(-1).clone() if v.dim() == 0 else v.contiguous()
    tensors["rng"] = torch.get_rng_state()
    return tensors, global_step


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--reads", required=True, help="file the stream appends its shard opens to")
    p.add_argument("--aug-workers", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--hold-at", type=int, default=None, help="after step N, wait until killed (the test kills it)")
    p.add_argument("--sync-saves", action="store_true", help="wait for each checkpoint's commit (kill timing)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(message)s", force=True)
    warnings.filterwarnings("ignore", message=".*set_vital.*")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    tensors, global_step = train(
        args.ckpt_dir,
        args.data_dir,
        args.reads,
        aug_workers=args.aug_workers,
        epochs=args.epochs,
        hold_at=args.hold_at,
        sync_saves=args.sync_saves,
    )
    save_file(tensors, args.out)
    say(f"done {global_step}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
