"""A DDP training job for torchrun (gloo, CPU) written like the single-process loop: the only difference is
running under torchrun. Prints ``step N`` on rank 0 after every optimizer step and writes, at the end, every
rank's final model/optimizer tensors and RNG state to ``--out-dir/rank{R}.safetensors``.

``--die-rank R --die-at NAME`` makes rank R SIGKILL itself at syncckpt failpoint NAME (a rank dying mid-save).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

_args = sys.argv
if "--die-rank" in _args and os.environ.get("RANK") == _args[_args.index("--die-rank") + 1]:
    # failpoints are read when syncckpt is imported: arm them for this rank only
    os.environ["SYNCCKPT_FAILPOINT"] = _args[_args.index("--die-at") + 1]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from syncckpt import CheckpointManager, ResumableSampler  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from procs import end_job, say  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--remote", default=None)
    p.add_argument("--storage-options", default=None)
    p.add_argument("--die-rank", default=None)
    p.add_argument("--die-at", default=None)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        stream=sys.stdout,
        format=f"[rank{rank}] %(levelname)s %(message)s",
        force=True,
    )

    g = torch.Generator().manual_seed(7)
    x = torch.randn(128, 12, generator=g)
    ds = TensorDataset(x, (x[:, :2].sum(1) > 0).long())
    torch.manual_seed(100 + rank)  # different dropout streams per rank: each rank's RNG must be restored
    net = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Dropout(0.25), torch.nn.Linear(24, 2))
    model = DistributedDataParallel(net)
    sampler = ResumableSampler(ds, batch_size=8, shuffle=True, seed=3)  # num_replicas/rank from torch.distributed
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    mgr = CheckpointManager(
        args.ckpt_dir,
        save_every_n_steps=2,
        keep_last=2,
        keep_epochs=2,
        remote=args.remote,
        storage_options=json.loads(args.storage_options) if args.storage_options else None,
        grace_period=30,
    )
    mgr.register(model=model, optimizer=opt, scheduler=sched, sampler=sampler)
    info = mgr.resume()
    start_epoch = info.epoch if info else 0
    global_step = info.global_step if info else 0
    accum = 2
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        first = info.batch_idx + 1 if info and epoch == info.epoch else 0
        for batch_idx, (xb, yb) in enumerate(loader, start=first):
            sync = (batch_idx + 1) % accum == 0
            if sync:
                loss = torch.nn.functional.cross_entropy(model(xb), yb) / accum
                loss.backward()
            else:
                with model.no_sync():
                    loss = torch.nn.functional.cross_entropy(model(xb), yb) / accum
                    loss.backward()
            if sync:
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                global_step += 1
                mgr.step(global_step, epoch=epoch, batch_idx=batch_idx)
                if rank == 0:
                    say(f"step {global_step}")
        mgr.save_epoch(epoch, global_step=global_step)
    mgr.close()
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            tensors[f"opt.{pid}.{k}"] = v.reshape(-1).clone() if v.dim() == 0 else v.contiguous()
    tensors["rng"] = torch.get_rng_state()
    os.makedirs(args.out_dir, exist_ok=True)
    save_file(tensors, os.path.join(args.out_dir, f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        say(f"done {global_step}")
    return 0


if __name__ == "__main__":
    end_job(main())
