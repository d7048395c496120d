"""An FSDP2 job for torchrun (gloo, CPU) exercising syncckpt.sharded; driven by test_sharded.py.

``save``: a few AdamW steps on a model sharded with ``fully_shard`` over a CPU mesh of all ranks, then the
flattened model + optimizer tensors are snapshotted on the training thread and written by ``save_shards`` from a
background thread over a dedicated gloo group while the training thread takes one more step. Rank 0 writes the
gathered (full) tensors as of the snapshot to ``--ref`` and every rank prints ``SAVE_RETURNED <rank> <json files>``.
With ``SHARDED_DIE_RANK=R`` in the environment, rank R SIGKILLs itself right after writing its shard.

``load``: the same model and optimizer sharded over the current world size (1 or 2), filled by ``load_shards``
with every unpickling entry point poisoned, restored with ``set_state_dict``; rank 0 compares the gathered tensors
with ``--ref`` bit for bit and prints ``LOAD_OK <n>``; then one more training step must run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if os.environ.get("SHARDED_DIE_RANK") is not None and os.environ.get("SHARDED_DIE_RANK") == os.environ.get("RANK"):
    # failpoints are read when syncckpt is imported: arm this one for this rank only
    os.environ["SYNCCKPT_FAILPOINT"] = "sharded-after-write"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.distributed_c10d as c10d  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from syncckpt.sharded import has_dtensors, load_shards, save_shards, snapshot_shards  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from procs import end_job, say  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # uneven shapes: 7 rows shard 4/3, 3 rows 2/1, 1 row leaves rank 1 an empty shard
        self.a = torch.nn.Linear(5, 7)
        self.b = torch.nn.Linear(7, 3)
        self.c = torch.nn.Linear(3, 1)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 5))  # plain (replicated) tensors: deduplicated
        self.register_buffer("tag", torch.arange(3).to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x * self.scale)))))


def build(world: int):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = Net()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (net.a, net.b, net.c):
        fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    return net, opt


def train_step(net, opt, step: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    x = torch.randn(6, 5, generator=g)
    loss = (net(x) - 1.0).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def flat_state(net, opt) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(model sd, flat optimizer sd, {name: tensor or DTensor}); non-tensors stay in the optimizer dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(net, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors = {f"model.{k}": v for k, v in msd.items()}
    tensors.update({f"optim.{k}": v for k, v in osd.items() if isinstance(v, torch.Tensor)})
    return msd, osd, tensors


def full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gathered copies (collective over the default group)."""
    out = {}
    for k, v in tensors.items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().clone().contiguous()
    return out


@contextlib.contextmanager
def no_unpickling():
    """Every way torch or DCP could unpickle raises while inside."""

    def boom(*a, **k):
        raise AssertionError("unpickling attempted during load_shards")

    class Boom:
        def __init__(self, *a, **k):
            boom()

    targets = [
        (pickle, "load", boom),
        (pickle, "loads", boom),
        (pickle, "Unpickler", Boom),
        (pickle, "_load", boom),
        (pickle, "_loads", boom),
        (pickle, "_Unpickler", Boom),
        (torch, "load", boom),
        (torch.serialization, "load", boom),
        (c10d, "_unpickler", Boom),
    ]
    saved = [(mod, name, getattr(mod, name)) for mod, name, _ in targets]
    for mod, name, repl in targets:
        setattr(mod, name, repl)
    try:
        yield
    finally:
        for mod, name, orig in saved:
            setattr(mod, name, orig)


def do_save(args, rank: int, world: int) -> None:
    net, opt = build(world)
    for step in range(3):
        train_step(net, opt, step)
    _, _, tensors = flat_state(net, opt)
    assert has_dtensors(tensors)
    ref = full(tensors)
    save_group = dist.new_group(backend="gloo")  # the writer's own group, as the manager has
    snap = snapshot_shards(tensors)  # training thread: the only part it waits for
    seen = {}

    def write():
        seen["thread"] = threading.current_thread().name
        return save_shards(snap, Path(args.folder), process_group=save_group)

    with ThreadPoolExecutor(1, thread_name_prefix="writer") as ex:
        fut = ex.submit(write)
        train_step(net, opt, 3)  # FSDP collectives on the default group while the save runs on its own
        files = fut.result(timeout=120)
    assert seen["thread"].startswith("writer")
    moved = full(flat_state(net, opt)[2])
    assert not torch.equal(moved["model.a.weight"], ref["model.a.weight"]), "the extra step changed nothing"
    say(f"SAVE_RETURNED {rank} {json.dumps(files)}")
    if rank == 0:
        save_file(ref, args.ref)
    dist.barrier()


def do_load(args, rank: int, world: int) -> None:
    net, opt = build(world)
    msd, osd, targets = flat_state(net, opt)  # get_state_dict initialises the optimizer state
    with no_unpickling():
        load_shards(targets, Path(args.folder), process_group=dist.new_group(backend="gloo"))
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        net,
        opt,
        model_state_dict=msd,
        optim_state_dict=osd,
        options=StateDictOptions(flatten_optimizer_state_dict=True),
    )
    got = full(flat_state(net, opt)[2])  # read back from the model and optimizer, not from the targets
    if rank == 0:
        ref = load_file(args.ref)
        assert got.keys() == ref.keys(), sorted(set(got) ^ set(ref))
        bad = [k for k in ref if got[k].dtype != ref[k].dtype or not torch.equal(got[k], ref[k])]
        assert not bad, f"differs from the reference: {bad}"
        say(f"LOAD_OK {len(ref)}")
    train_step(net, opt, 3)
    dist.barrier()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["save", "load"])
    p.add_argument("--folder", required=True)
    p.add_argument("--ref", required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    (do_save if args.mode == "save" else do_load)(args, rank, world)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    end_job(main())
