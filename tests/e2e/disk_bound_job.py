"""A mirrored run on a small disk: a checkpoint of about 12 MB (weights + AdamW moments) at every step.

Data for step N is drawn from a generator seeded with N, so a resumed run sees the same batches. Prints the peak
disk use of the checkpoint folder's file system (``PEAK <bytes>``) and writes the final model and optimizer
tensors to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys

import safetensors.torch
import torch
from procs import say

from syncckpt import CheckpointManager


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=36)
    p.add_argument("--stop-after", type=int, default=None)
    p.add_argument("--remote", default=None)
    p.add_argument("--keep-local", default="all")
    p.add_argument("--keep-last", type=int, default=5)
    p.add_argument("--save-every", type=int, default=1, help="0: no step checkpoints (the reference run)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stdout)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(512, 512) for _ in range(4)))  # 1.05 M parameters
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    peak = 0
    with CheckpointManager(
        args.ckpt_dir,
        save_every_n_steps=args.save_every or None,
        keep_last=args.keep_last,
        remote=args.remote,
        keep_local=args.keep_local,
        handle_sigterm=False,
    ) as mgr:
        mgr.register(model=model, optimizer=opt)
        info = mgr.resume()
        for step in range((info.global_step if info else 0) + 1, args.steps + 1):
            x = torch.randn(8, 512, generator=torch.Generator().manual_seed(step))
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mgr.step(step, batch_idx=step - 1)
            peak = max(peak, shutil.disk_usage(args.ckpt_dir).used)
            if step == args.stop_after:
                break
        mgr.wait()
        peak = max(peak, shutil.disk_usage(args.ckpt_dir).used)
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    for i, st in opt.state_dict()["state"].items():
        tensors.update({f"opt.{i}.{k}": v.contiguous() for k, v in st.items() if torch.is_tensor(v)})
    safetensors.torch.save_file(tensors, args.out)
    say(f"PEAK {peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
