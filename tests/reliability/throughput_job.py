"""Two training runs in one process, their optimizer steps interleaved one by one, each with its own
CheckpointManager mirroring to its own remote; prints one JSON line with every step's wall time and each
manager's status once its uploads finished.

Run by test_network_faults.py in a process of its own, so that the S3 server and the fault proxies (threads of the
test process) do not compete with the training loop for the interpreter lock: here, as in a real job, only
syncckpt's own threads do.

    python throughput_job.py '{"steps": 500, "runs": {"a": {"dir": ..., "url": ..., "storage_options": {...}}}}'
"""

from __future__ import annotations

import json
import logging
import sys
import time


def main(spec: dict) -> dict:
    import torch

    from syncckpt import CheckpointManager
    from syncckpt.remote.retry import RetryPolicy

    torch.set_num_threads(1)  # one core for the loops, one for the uploaders, the S3 server and the proxies
    retry = RetryPolicy(**spec.get("retry", {}))
    runs = {}
    for name, r in spec["runs"].items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(256, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 512),
            torch.nn.ReLU(),
            torch.nn.Linear(512, 10),
        )  # ~400k parameters: a few ms a step
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mgr = CheckpointManager(
            r["dir"],
            save_every_n_steps=spec.get("save_every", 10),
            keep_last=10_000,
            remote=r["url"],
            storage_options=r["storage_options"],
            remote_options={"retry": retry},
            handle_sigterm=False,
        )
        mgr.register(model=model, optimizer=opt)
        runs[name] = (model, opt, mgr, torch.Generator().manual_seed(1), [])
    names = list(runs)
    save_every = spec.get("save_every", 10)
    for i in range(spec["steps"]):
        # Which run goes first flips every save period, so neither always saves while the other's writer runs.
        for name in names if (i // save_every) % 2 == 0 else names[::-1]:
            model, opt, mgr, gen, times = runs[name]
            x, y = torch.randn(128, 256, generator=gen), torch.randint(0, 10, (128,), generator=gen)
            t = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            mgr.step(i + 1)
            times.append(time.perf_counter() - t)
    out = {}
    for name, (_, _, mgr, _, times) in runs.items():
        t = time.perf_counter()
        done = mgr.wait(timeout=spec.get("wait_timeout", 300))
        out[name] = {"times": times, "flushed": done, "wait_s": time.perf_counter() - t, "status": mgr.status()}
        mgr.close(timeout=30)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    result = main(json.loads(sys.argv[1]))
    print(json.dumps(result), flush=True)
