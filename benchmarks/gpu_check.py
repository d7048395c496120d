"""The GPU checks of issue 19, prepared to run in under 5 minutes on one GPU (an H200 was the target).

Measures, on ``cuda:0``:

  1. ``step()`` stall on a due save (staging buffers warm) against a pinned device-to-host copy of the same state
     (``copy_(non_blocking=True)`` of every tensor into preallocated, touched pinned tensors): the host time until
     the call returns, and until the copies have landed; both after ``mgr.wait()``, interleaved rounds, medians;
  2. whether those copies overlap the next training step, with CUDA events: the GPU time of the copies
     (``step()`` enqueues them on the current stream), a training step alone, and ``step()`` followed at once by a
     training step; ``overlap`` is the share of the shorter of the two that ran concurrently
     (``(copy + train - together) / min(copy, train)``, 0 = serial);
  3. bit-exact resume on CUDA with deterministic kernels (``torch.use_deterministic_algorithms(True)``,
     ``CUBLAS_WORKSPACE_CONFIG=:4096:8``): a small MLP with dropout (CUDA RNG) trains 2N steps with a checkpoint
     at step N; a fresh model, optimizer and CUDA RNG state resume from it and train to 2N; every loss and every
     final parameter must be bitwise equal;
  4. save and resume of a 1B-parameter bf16 model (a stack of bias-free 8192 x 8192 Linear layers) + AdamW
     (bf16 moments: 6 GB of state): first save stall, time until committed on local disk, and a fresh manager
     resuming it into a new model + optimizer on the GPU, compared tensor by tensor.

Prints a table and writes ``benchmarks/results/gpu_check.json``.

Without a GPU it prints ``no GPU found: nothing measured`` and exits with status 0 right after importing torch.
Exit status 1: a correctness check failed (resume not bit-exact, or a resumed tensor differs). Sections that would
start after ``--budget-s`` seconds are skipped and reported as such.

Usage:  python benchmarks/gpu_check.py [--params 1e9] [--rounds 3] [--budget-s 210]
        python benchmarks/gpu_check.py --cpu-dry-run   # the same code paths on the CPU at a tiny size, no events
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA initialises: deterministic cuBLAS

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

NO_GPU = "no GPU found: nothing measured"
T_START = time.monotonic()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=1e9, help="parameters of the bf16 model (sections 1, 2, 4)")
    ap.add_argument("--width", type=int, default=8192, help="width of its Linear layers")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of section 1")
    ap.add_argument("--budget-s", type=float, default=210.0, help="skip sections that would start later")
    ap.add_argument("--cpu-dry-run", action="store_true", help="run the code paths on the CPU (tiny, no events)")
    args = ap.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(NO_GPU)
        return 0
    if args.cpu_dry_run:
        args.params, args.width = min(args.params, 4 * 256 * 256), min(args.width, 256)
    return GpuCheck(args).run()


def size_label(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.2f}M"


class Clock:
    """CUDA events on the GPU (GPU time), perf_counter on the CPU dry run."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class GpuCheck:
    def __init__(self, args: argparse.Namespace) -> None:
        import tempfile
        from pathlib import Path

        self.args = args
        self.cuda = not args.cpu_dry_run
        self.device = torch.device("cuda:0" if self.cuda else "cpu")
        self.clock = Clock(self.cuda)
        self.root = Path(tempfile.mkdtemp(prefix="syncckpt-gpu-check-"))
        self.rows: list[dict] = []
        self.data: dict = {}
        self.failed: list[str] = []

    # ---- helpers -----------------------------------------------------------------------------------------------
    def row(self, check: str, result: str, detail: str = "") -> None:
        self.rows.append({"check": check, "result": result, "detail": detail})
        print(f"  {check}: {result} {detail}", flush=True)

    def over_budget(self, section: str) -> bool:
        spent = time.monotonic() - T_START
        if spent > self.args.budget_s:
            self.row(section, "SKIPPED", f"{spent:.0f}s spent, budget {self.args.budget_s:.0f}s")
            return True
        return False

    def big_model(self, seed: int):
        torch.manual_seed(seed)
        layers = max(1, round(self.args.params / self.args.width**2))
        model = torch.nn.Sequential(
            *(
                torch.nn.Linear(self.args.width, self.args.width, bias=False, device=self.device, dtype=torch.bfloat16)
                for _ in range(layers)
            )
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        return model, opt

    def big_step(self, model, opt, batch: int) -> None:
        x = torch.randn(batch, self.args.width, device=self.device, dtype=torch.bfloat16)
        model(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    @staticmethod
    def tensors(model, opt) -> list[torch.Tensor]:
        out = list(model.state_dict().values())
        for st in opt.state_dict()["state"].values():
            out.extend(v for v in st.values() if isinstance(v, torch.Tensor))
        return out

    # ---- the run -----------------------------------------------------------------------------------------------
    def run(self) -> int:
        import shutil

        try:
            info = {"device": str(self.device), "cpu_dry_run": not self.cuda, "torch": torch.__version__}
            if self.cuda:
                info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
            self.data["info"] = info
            print(f"gpu_check on {info.get('gpu', 'CPU (dry run)')}", flush=True)
            model, opt = self.big_model(seed=0)
            self.big_step(model, opt, batch=8)  # populates AdamW's moments
            self.data["big_model"] = {
                "params": sum(p.numel() for p in model.parameters()),
                "state_bytes": sum(t.numel() * t.element_size() for t in self.tensors(model, opt)),
            }
            if not self.over_budget("1+2 stall and overlap"):
                self.stall_and_overlap(model, opt)
            if not self.over_budget("4 big bf16 save + resume"):
                self.big_save_resume(model, opt)
            del model, opt
            if not self.over_budget("3 bit-exact resume"):
                self.bit_exact()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
        self.report()
        return 1 if self.failed else 0

    def stall_and_overlap(self, model, opt) -> None:
        import statistics

        from syncckpt import CheckpointManager

        clock, sb = self.clock, self.data["big_model"]["state_bytes"]
        mgr = CheckpointManager(self.root / "stall", save_every_n_steps=1, keep_last=1, handle_sigterm=False)
        mgr.register(model=model, optimizer=opt)
        step = 1
        mgr.step(step, epoch=0, batch_idx=0)  # allocates (and pins) the staging buffers
        mgr.wait()
        pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=self.cuda).zero_() for t in self.tensors(model, opt)]
        samples: dict[str, list[float]] = {"copy_issue": [], "copy_landed": [], "step_host": [], "step_landed": []}
        waits = []
        for i in range(self.args.rounds):
            for arm in ("copy", "step") if i % 2 == 0 else ("step", "copy"):
                t = time.perf_counter()
                mgr.wait()
                waits.append(time.perf_counter() - t)
                clock.sync()
                t0 = time.perf_counter()
                if arm == "copy":
                    for b, src in zip(pinned, self.tensors(model, opt), strict=True):
                        b.copy_(src, non_blocking=True)
                else:
                    step += 1
                    assert mgr.step(step, epoch=0, batch_idx=step - 1)
                t1 = time.perf_counter()
                clock.sync()
                t2 = time.perf_counter()
                samples[f"{arm}_issue" if arm == "copy" else "step_host"].append(t1 - t0)
                samples[f"{arm}_landed"].append(t2 - t0)
        med = {k: statistics.median(v) for k, v in samples.items()}
        self.data["stall"] = {"samples_s": samples, "median_s": med, "background_wait_s": waits}
        self.row(
            "1 step() stall (host)",
            f"{med['step_host']:.3f}s",
            f"= {med['step_host'] / med['copy_landed']:.2f}x the pinned D2H copy until landed "
            f"({med['copy_landed']:.3f}s, {sb / med['copy_landed'] / 1e9:.1f} GB/s); copy issue alone "
            f"{med['copy_issue']:.3f}s; step() until its copies landed {med['step_landed']:.3f}s",
        )

        # 2. overlap with the next training step, GPU time from CUDA events
        batch = 4096 if self.cuda else 8
        for _ in range(2):  # warm the kernels
            self.big_step(model, opt, batch)
        clock.sync()
        alone = []
        for _ in range(3):
            a = clock.mark()
            self.big_step(model, opt, batch)
            b = clock.mark()
            clock.sync()
            alone.append(clock.ms(a, b))
        mgr.wait()
        clock.sync()
        e0 = clock.mark()
        step += 1
        assert mgr.step(step, epoch=0, batch_idx=step - 1)
        e1 = clock.mark()
        self.big_step(model, opt, batch)
        e2 = clock.mark()
        clock.sync()
        train_ms = statistics.median(alone)
        copy_ms, together_ms = clock.ms(e0, e1), clock.ms(e0, e2)
        copy_alone_ms = med["copy_landed"] * 1e3
        overlap = (copy_alone_ms + train_ms - together_ms) / max(1e-9, min(copy_alone_ms, train_ms))
        overlap = min(1.0, max(0.0, overlap))
        self.data["overlap"] = {
            "train_step_alone_ms": alone,
            "copies_on_stream_ms": copy_ms,
            "step_then_train_ms": together_ms,
            "pinned_copy_alone_ms": copy_alone_ms,
            "overlap_fraction": overlap,
            "batch": batch,
        }
        self.row(
            "2 copy overlaps next step",
            "yes" if overlap > 0.5 else "no",
            f"overlap {overlap:.2f}: step()'s copies {copy_ms:.1f} ms on the training stream, train step alone "
            f"{train_ms:.1f} ms, step() + train step {together_ms:.1f} ms (serial would be "
            f"{copy_alone_ms + train_ms:.1f} ms)",
        )
        mgr.close()
        del pinned, mgr

    def big_save_resume(self, model, opt) -> None:
        import gc

        from syncckpt import CheckpointManager

        gc.collect()
        sb = self.data["big_model"]["state_bytes"]
        directory = self.root / "big"
        self.clock.sync()
        with CheckpointManager(directory, save_every_n_steps=None, handle_sigterm=False) as mgr:
            mgr.register(model=model, optimizer=opt)
            t0 = time.perf_counter()
            mgr.save(100, epoch=0, batch_idx=99)
            t1 = time.perf_counter()
            mgr.wait()
            t2 = time.perf_counter()
        p = self.data["big_model"]["params"]
        on_disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        fresh, fresh_opt = self.big_model(seed=1)  # new tensors, AdamW without state: a fresh session
        self.clock.sync()
        t3 = time.perf_counter()
        with CheckpointManager(directory, save_every_n_steps=None, handle_sigterm=False) as mgr:
            mgr.register(model=fresh, optimizer=fresh_opt)
            resumed = mgr.resume()
        self.clock.sync()
        t4 = time.perf_counter()
        saved, loaded = self.tensors(model, opt), self.tensors(fresh, fresh_opt)
        same = resumed is not None and len(saved) == len(loaded)
        same = same and all(a.device == b.device and torch.equal(a, b) for a, b in zip(saved, loaded, strict=True))
        self.data["big"] = {
            "first_save_stall_s": t1 - t0,
            "save_to_committed_s": t2 - t0,
            "bytes_on_disk": on_disk,
            "resume_s": t4 - t3,
            "identical": same,
        }
        self.row(
            f"4 {size_label(p)} bf16 + AdamW save",
            f"{t2 - t0:.1f}s to committed",
            f"{p:,} params, {sb / 1e9:.2f} GB state, {on_disk / 1e9:.2f} GB on disk; first-save stall "
            f"{t1 - t0:.2f}s (allocates the pinned staging buffers); {sb / (t2 - t0) / 1e9:.2f} GB/s",
        )
        self.row(
            f"4 {size_label(p)} bf16 + AdamW resume",
            f"{t4 - t3:.1f}s" + ("" if same else " MISMATCH"),
            f"fresh manager, model + AdamW on {self.device}; {sb / (t4 - t3) / 1e9:.2f} GB/s; identical: {same}",
        )
        if not same:
            self.failed.append("the big model's resume differs from the saved state")
        del fresh, fresh_opt

    def bit_exact(self) -> None:
        from syncckpt import CheckpointManager

        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        n, directory = 10, self.root / "exact"

        def build(seed: int):
            torch.manual_seed(seed)
            model = torch.nn.Sequential(
                torch.nn.Linear(512, 1024),
                torch.nn.GELU(),
                torch.nn.Dropout(0.1),
                torch.nn.Linear(1024, 1024),
                torch.nn.GELU(),
                torch.nn.Dropout(0.1),
                torch.nn.Linear(1024, 512),
            ).to(self.device)
            return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

        def train(model, opt, steps: range) -> list[float]:
            losses = []
            for s in steps:
                g = torch.Generator().manual_seed(s)  # the batch of step s, as a resumable loader would give it
                x = torch.randn(64, 512, generator=g).to(self.device)
                loss = (model(x) - x).pow(2).mean()  # dropout draws from the device's RNG
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
            return losses

        model, opt = build(0)
        with CheckpointManager(directory, save_every_n_steps=None, handle_sigterm=False) as mgr:
            mgr.register(model=model, optimizer=opt)
            ref = train(model, opt, range(1, n + 1))
            mgr.save(n, epoch=0, batch_idx=n - 1)
            mgr.wait()
        ref += train(model, opt, range(n + 1, 2 * n + 1))
        ref_params = [p.detach().clone() for p in model.parameters()]

        fresh, fresh_opt = build(123)
        torch.manual_seed(999)  # a different RNG state than the saved one: resume must put it back
        if self.cuda:
            torch.cuda.manual_seed_all(999)
        with CheckpointManager(directory, save_every_n_steps=None, handle_sigterm=False) as mgr:
            mgr.register(model=fresh, optimizer=fresh_opt)
            info = mgr.resume()
        got = train(fresh, fresh_opt, range(n + 1, 2 * n + 1))
        losses_same = got == ref[n:]
        params_same = all(torch.equal(a, b) for a, b in zip(ref_params, fresh.parameters(), strict=True))
        ok = info is not None and info.global_step == n and losses_same and params_same
        self.data["bit_exact"] = {
            "reference_losses": ref,
            "resumed_losses": got,
            "losses_identical": losses_same,
            "params_identical": params_same,
        }
        self.row(
            "3 bit-exact resume",
            "yes" if ok else "NO",
            f"deterministic kernels, dropout on {self.device}: {n} steps after resume, losses identical "
            f"{losses_same}, parameters identical {params_same}",
        )
        if not ok:
            self.failed.append("resume is not bit-exact")
        torch.use_deterministic_algorithms(False)

    def report(self) -> None:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from common import print_table, write_json

        title = f"GPU check ({self.data['info'].get('gpu', 'CPU dry run')}), {time.monotonic() - T_START:.0f}s"
        print_table(title, self.rows, ["check", "result", "detail"])
        name = "gpu_check" if self.cuda else "gpu_check_cpu_dry_run"
        path = write_json(name, {**self.data, "rows": self.rows, "failed": self.failed})
        print(f"\nwrote {path}")
        if self.failed:
            print(f"FAILED: {'; '.join(self.failed)}")


if __name__ == "__main__":
    sys.exit(main())
