"""An S3 outage during training: the loop keeps its speed (it never waits on the network), uploads fail and are
retried, and once the store is back mirroring resumes by itself; the bucket ends holding the final checkpoint.

The outage is real network behaviour: a proxy between s3fs and the moto server resets every connection."""

from __future__ import annotations

import statistics
import time

import pytest
import torch

from syncckpt import CheckpointManager
from syncckpt.remote import open_remote
from syncckpt.remote.retry import RetryPolicy

pytestmark = pytest.mark.slow


def train_steps(mgr, model, opt, steps, start):
    times = []
    for step in range(start, start + steps):
        t0 = time.perf_counter()
        loss = model(torch.randn(64, 256)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mgr.step(step, epoch=0, batch_idx=step - 1)
        times.append(time.perf_counter() - t0)
    return times


def test_outage_keeps_training_speed_and_mirroring_resumes(
    tmp_path, fault_proxy, fault_s3_storage_options, s3_remote_url, s3_storage_options
):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(6)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    # A short retry policy so the uploader gives up on an attempt within a second (the default rides out
    # several minutes of trouble before it reports a failure).
    fast = RetryPolicy(attempts=2, initial_wait=0.05, max_wait=0.1, max_total=2)
    mgr = CheckpointManager(
        tmp_path / "ck",
        save_every_n_steps=10,
        keep_last=2,
        remote=s3_remote_url,
        storage_options=fault_s3_storage_options,
        handle_sigterm=False,
        remote_options={"retry": fast},
    )
    mgr.register(model=model, optimizer=opt)
    before = train_steps(mgr, model, opt, 60, 1)
    assert mgr.wait(timeout=120)
    fault_proxy.down()
    during, step = [], 61
    while mgr.status()["upload_failures"] < 2 and step < 5000:  # train on until the uploader felt the outage
        during += train_steps(mgr, model, opt, 10, step)
        step += 10
    failures_during = mgr.status()["upload_failures"]
    fault_proxy.up()
    last = step + 59
    after = train_steps(mgr, model, opt, 60, step)
    assert mgr.wait(timeout=180), mgr.status()
    status = mgr.status()
    mgr.close()

    med_before, med_during = statistics.median(before), statistics.median(during)
    print(
        f"\noutage: median step {med_before * 1e3:.2f} ms before, {med_during * 1e3:.2f} ms during the outage "
        f"(x{med_during / med_before:.2f}), {statistics.median(after) * 1e3:.2f} ms after; "
        f"upload failures {status['upload_failures']}, "
        f"connections refused {fault_proxy.counts}; mirrored {status['mirrored']}"
    )
    final = f"checkpoint-step-{last // 10 * 10}"
    assert failures_during >= 2, "the outage was not felt by the uploader"
    assert med_during <= 1.5 * med_before, "training slowed down during the outage"
    assert status["last_committed"] == final
    assert final in status["mirrored"] and not status["pending"] and status["uploading"] is None
    # every checkpoint committed after the store came back was mirrored or superseded by a newer one
    after_names = {f"checkpoint-step-{s}" for s in range(step // 10 * 10 + 10, last + 1, 10)}
    # (mirrored_history: "mirrored" lists only what retention has not deleted from the remote since)
    assert after_names <= set(status["mirrored_history"]) | set(status["skipped"])
    direct = open_remote(s3_remote_url, s3_storage_options)  # straight to moto, no proxy
    assert direct.read_latest().name == final
    remote_names = direct.list_checkpoints()
    assert final in remote_names and len(remote_names) == 2  # keep_last=2 applied remotely too
    manifest, _ = direct.read_manifest(final)
    direct.download_checkpoint(final, manifest, tmp_path / "verify")  # digests checked
