"""Incremental mirroring: with most of a model frozen, does each checkpoint upload only what changed?

A fine-tune of the benchmark transformer with ~90% of its parameters frozen (embedding, output head and all but the
last layers have ``requires_grad=False``; AdamW over the rest) is checkpointed after every one of ``--checkpoints``
optimizer steps and mirrored with ``incremental=True`` to moto S3 (a child process); each mirror finishes before
the next step. Per checkpoint, the bytes sent (``Uploader.bytes_uploaded``) and the bytes of blobs that appeared in
the bucket (listing ``blobs/``) are compared with the bytes of the tensors that changed (trainable parameters +
their AdamW state) and with the full checkpoint.

Target: after the first checkpoint, bytes sent <= 1.1 x changed bytes + a few KB (the manifest, state.json, RNG
state); the full checkpoint is shown for comparison (changed bytes are about a quarter of it). Finally a fresh
session (new manager, empty folder, zeroed model) resumes from the bucket and every tensor is compared.

Usage:  python benchmarks/bench_incremental.py [--layers 12] [--checkpoints 4] [--trainable-layers N]
Writes benchmarks/results/incremental.json and prints a table.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import fsspec
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (  # noqa: E402
    build_model,
    make_tokens,
    moto_s3,
    n_params,
    print_table,
    state_bytes,
    train_step,
    unique_prefix,
    write_json,
)

from syncckpt import CheckpointManager  # noqa: E402


def fine_tune_model(layers: int, trainable_layers: int | None) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    """The benchmark model with all but the last ``trainable_layers`` encoder layers frozen (default: ~10% of
    the parameters trainable), and AdamW over the trainable ones."""
    model, _ = build_model(layers=layers)
    encoder = model[1].layers
    per_layer = sum(p.numel() for p in encoder[0].parameters())
    if trainable_layers is None:
        trainable_layers = max(1, round(0.1 * n_params(model) / per_layer))
    trainable_layers = min(trainable_layers, len(encoder))
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in encoder[len(encoder) - trainable_layers :]:
        for p in layer.parameters():
            p.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt, trainable_layers


def blob_sizes(fs, url: str) -> dict[str, int]:
    fs.invalidate_cache()
    try:
        return {k: int(v["size"]) for k, v in fs.find(f"{url}/blobs", detail=True).items()}
    except FileNotFoundError:
        return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--trainable-layers", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model, opt, k = fine_tune_model(args.layers, args.trainable_layers)
    total = n_params(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = make_tokens(vocab=model[-1].out_features)
    root = Path(tempfile.mkdtemp(prefix="syncckpt-bench-"))
    rows = []
    try:
        with moto_s3() as s3:
            options = s3.options()
            url = unique_prefix("s3", "incremental")
            fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
            mgr = CheckpointManager(
                root / "run",
                save_every_n_steps=1,
                keep_last=1,
                remote=url,
                storage_options=options,
                incremental=True,
                on_upload_error="raise",
                handle_sigterm=False,
            )
            mgr.register(model=model, optimizer=opt)
            uploader = mgr._uploader  # the benchmark reads its byte counter
            for step in range(1, args.checkpoints + 1):
                train_step(model, opt, tokens)
                changed = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
                changed += state_bytes(opt)
                blobs_before, sent_before = blob_sizes(fs, url), uploader.bytes_uploaded
                assert mgr.step(step, epoch=0, batch_idx=step - 1)
                mgr.wait()
                name = f"checkpoint-step-{step}"
                full = sum(p.stat().st_size for p in (root / "run" / name).iterdir() if p.name != "manifest.json")
                blobs_after = blob_sizes(fs, url)
                sent = uploader.bytes_uploaded - sent_before
                new_blobs = sum(size for b, size in blobs_after.items() if b not in blobs_before)
                rows.append(
                    {
                        "checkpoint": name,
                        "sent_MB": sent / 1e6,
                        "new_blobs_MB": new_blobs / 1e6,
                        "changed_MB": changed / 1e6,
                        "full_MB": full / 1e6,
                        "x_changed": sent / changed,
                        "excess_KB": (sent - changed) / 1e3,
                        "x_full": sent / full,
                        "bucket_MB": sum(blobs_after.values()) / 1e6,
                    }
                )
                print(
                    f"  {name}: sent {sent / 1e6:.1f} MB, changed {changed / 1e6:.1f} MB, full {full / 1e6:.1f} MB",
                    flush=True,
                )
            mgr.close()

            # A fresh session: empty folder, zeroed model, empty optimizer; everything comes from the bucket.
            model2, opt2, _ = fine_tune_model(args.layers, k)
            with torch.no_grad():
                for p in model2.parameters():
                    p.zero_()
            with CheckpointManager(
                root / "fresh",
                save_every_n_steps=None,
                remote=url,
                storage_options=options,
                incremental=True,
                handle_sigterm=False,
            ) as mgr2:
                mgr2.register(model=model2, optimizer=opt2)
                info = mgr2.resume()
            sd1, sd2 = model.state_dict(), model2.state_dict()
            same_model = sd1.keys() == sd2.keys() and all(torch.equal(sd1[n], sd2[n]) for n in sd1)
            o1, o2 = opt.state_dict()["state"], opt2.state_dict()["state"]
            same_opt = o1.keys() == o2.keys() and all(
                torch.equal(o1[i][n], o2[i][n]) if isinstance(o1[i][n], torch.Tensor) else o1[i][n] == o2[i][n]
                for i in o1
                for n in o1[i]
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)

    later = rows[1:] or rows
    title = (
        f"Incremental mirroring to moto S3: {total / 1e6:.0f}M params, last {k} of {args.layers} layers trainable "
        f"({trainable / 1e6:.1f}M = {100 * trainable / total:.1f}%), AdamW; target x_changed <= 1.1 (+ a few KB) "
        f"after the first checkpoint"
    )
    print_table(
        title,
        rows,
        [
            "checkpoint",
            "sent_MB",
            "new_blobs_MB",
            "changed_MB",
            "full_MB",
            "x_changed",
            "excess_KB",
            "x_full",
            "bucket_MB",
        ],
    )
    print(
        f"\nafter the first checkpoint: median x_changed {statistics.median(r['x_changed'] for r in later):.3f}, "
        f"median excess {statistics.median(r['excess_KB'] for r in later):.1f} KB, changed/full "
        f"{later[0]['changed_MB'] / later[0]['full_MB']:.3f}"
    )
    print(
        f"fresh session resumed from {info.name if info else None} ({info.source if info else '-'}): model "
        f"identical: {same_model}, optimizer identical: {same_opt}"
    )
    path = write_json(
        "incremental",
        {
            "params": total,
            "trainable_params": trainable,
            "trainable_layers": k,
            "rows": rows,
            "resumed": info.name if info else None,
            "resume_identical": same_model and same_opt,
        },
    )
    print(f"\nwrote {path}")
    if not (info and same_model and same_opt):
        sys.exit("the fresh session did not restore the mirrored state")


if __name__ == "__main__":
    main()
