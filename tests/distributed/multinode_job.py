"""A DDP job for two torchrun "nodes" on one machine, each with its own checkpoint directory (no shared file
system): the training loop is ddp_job.py's. Every rank prints ``pid RANK PID`` at start (torchrun starts ranks in
sessions of their own, so a test kills each pid); rank 0 prints ``step N`` after every optimizer step, once a due
save is committed (``--sync-saves``: mirrored too, so a kill after ``step N`` follows a committed checkpoint).
At the end every rank writes its final model/optimizer tensors and RNG state to ``--out-dir/rank{R}.safetensors``.

``--fsdp``: the same loop with the model sharded by FSDP2 (``fully_shard`` over all 4 ranks) instead of DDP, so
every rank writes its own DCP shard; the tensors written are each rank's local shards. ``--dump-at N``: every rank
also writes its tensors after step N to ``--out-dir/at-step-N-rank{R}.safetensors`` before rank 0 prints ``step N``.
After resume, each node's first rank prints ``resumed-files JSON``: the files of the checkpoint folder it resumed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

from syncckpt import CheckpointManager, ResumableSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from procs import end_job, say  # noqa: E402


def fsdp(net: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in net:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(net, mesh=mesh)


def dump(model: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    """This rank's model and optimizer tensors (DTensors: the local shard) and RNG state."""

    def own(v: torch.Tensor) -> torch.Tensor:
        v = v.to_local() if hasattr(v, "to_local") else v
        return v.detach().reshape(-1).clone() if v.dim() == 0 else v.detach().contiguous()

    tensors = {f"model.{k}": own(v) for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        tensors.update((f"opt.{pid}.{k}", own(v)) for k, v in st.items())
    tensors["rng"] = torch.get_rng_state()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--remote", default=None)
    p.add_argument("--storage-options", default=None)
    p.add_argument("--sync-saves", action="store_true")
    p.add_argument("--fsdp", action="store_true")
    p.add_argument("--dump-at", type=int, default=None)
    p.add_argument("--hold-at", type=int, default=None, help="after step N, wait until killed (the test kills it)")
    args = p.parse_args()
    say(f"pid {os.environ['RANK']} {os.getpid()}")
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    leader = os.environ.get("LOCAL_RANK") == "0"
    logging.basicConfig(
        level=logging.INFO if leader else logging.WARNING,
        stream=sys.stdout,
        format=f"[rank{rank}] %(levelname)s %(message)s",
        force=True,
    )
    g = torch.Generator().manual_seed(7)
    x = torch.randn(256, 12, generator=g)
    ds = TensorDataset(x, (x[:, :2].sum(1) > 0).long())
    # FSDP2 keeps each rank's slice of that rank's own initial weights (DDP broadcasts rank 0's): one seed for all
    torch.manual_seed(0 if args.fsdp else 100 + rank)
    net = torch.nn.Sequential(torch.nn.Linear(12, 24), torch.nn.ReLU(), torch.nn.Dropout(0.25), torch.nn.Linear(24, 2))
    torch.manual_seed(100 + rank)  # different dropout streams per rank: each rank's RNG must be restored
    if args.fsdp:
        model = fsdp(net)
    else:
        # find_unused_parameters keeps DDP's gradient buckets in their first layout for the whole run (no rebuild
        # after the first iteration): with more than two ranks the allreduce's summation order depends on that
        # layout, and a resumed run would otherwise rebuild at another step than the uninterrupted one and differ
        # in the last bits.
        model = DistributedDataParallel(net, find_unused_parameters=True)
    sampler = ResumableSampler(ds, batch_size=8, shuffle=True, seed=3)
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    mgr = CheckpointManager(
        args.ckpt_dir,
        save_every_n_steps=2,
        keep_last=2,
        keep_epochs=1,
        remote=args.remote,
        storage_options=json.loads(args.storage_options) if args.storage_options else None,
        grace_period=30,
    )
    mgr.register(model=model, optimizer=opt, scheduler=sched, sampler=sampler)
    info = mgr.resume()
    if info is not None and leader:
        files = [f.relative_to(info.path).as_posix() for f in Path(info.path).rglob("*") if f.is_file()]
        say("resumed-files " + json.dumps(sorted(files)))
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
            else:  # FSDP2 reduces every micro-batch's gradients (no no_sync): the sharded gradients accumulate
                with contextlib.nullcontext() if args.fsdp else model.no_sync():
                    loss = torch.nn.functional.cross_entropy(model(xb), yb) / accum
                    loss.backward()
            if sync:
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                global_step += 1
                if mgr.step(global_step, epoch=epoch, batch_idx=batch_idx) and args.sync_saves:
                    mgr.wait()
                if global_step == args.dump_at:
                    dump(model, opt, os.path.join(args.out_dir, f"at-step-{global_step}-rank{rank}.safetensors"))
                    dist.barrier()  # every rank's file is written before rank 0 says the step is done
                if rank == 0:
                    say(f"step {global_step}")
                if global_step == args.hold_at:
                    threading.Event().wait()  # the killing test reads ahead of nothing: the job stops right here
        mgr.save_epoch(epoch, global_step=global_step)
    mgr.close()
    dump(model, opt, os.path.join(args.out_dir, f"rank{rank}.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        say(f"done {global_step}")
    return 0


if __name__ == "__main__":
    end_job(main())
