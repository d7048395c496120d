"""Shared pieces of the benchmarks: a >= 100M-parameter transformer with AdamW state, a training step, storage
servers in child processes, timing, table output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# gcsfs probes each bucket over gRPC for zonal/HNS features, which fake-gcs-server does not serve (a 60 s hang);
# gcsfs reads this when imported, so it is set before anything can import it. The AWS variables keep botocore
# from looking for real credentials or an instance-metadata endpoint.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
for _k, _v in (
    ("AWS_ACCESS_KEY_ID", "AKIATESTSYNCCKPT"),
    ("AWS_SECRET_ACCESS_KEY", "SECRET-DO-NOT-LOG"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
):
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

# SYNCCKPT_BENCH_RESULTS redirects the JSON files (the tests' smoke runs write to a temporary folder)
RESULTS = Path(os.environ.get("SYNCCKPT_BENCH_RESULTS") or Path(__file__).with_name("results"))
TESTS = Path(__file__).resolve().parent.parent / "tests"
BUCKET = "syncckpt-bench"


def build_model(
    d_model: int = 768, layers: int = 12, vocab: int = 32000
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A GPT-style stack (134M parameters at the defaults, 1.6 GB with AdamW state) whose AdamW state is populated
    by one step. ``layers=2`` fits a smoke test (63M)."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model, nhead=12, dim_feedforward=4 * d_model, batch_first=True)
    model = torch.nn.Sequential(
        torch.nn.Embedding(vocab, d_model),
        torch.nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False),
        torch.nn.Linear(d_model, vocab, bias=False),
    )
    with torch.no_grad():  # the encoder's layers are deep copies of one layer: make every tensor distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # random gradients: all-zero moments would be identical tensors, and
        p.grad = torch.randn_like(p) * 1e-3  # content-addressed (incremental) uploads would deduplicate them
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def build_mlp(size_m: float = 16.0, width: int = 1024) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A plain stack of ``width`` x ``width`` Linear layers with about ``size_m`` million parameters, and AdamW
    state populated by one step (fp32: 12 bytes of state per parameter). The size knob of the small benchmarks."""
    torch.manual_seed(0)
    layers = max(1, round(size_m * 1e6 / (width * width + width)))
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # distinct, non-zero moments (see build_model)
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def mlp_step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: int = 8, seed: int = 0) -> float:
    """One training step of a :func:`build_mlp` model on random data (changes every parameter and moment)."""
    g = torch.Generator().manual_seed(seed)
    width = model[0].in_features
    x = torch.randn(batch, width, generator=g)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def process_cpu_seconds() -> float:
    """User + system CPU seconds of every thread of this process so far (``getrusage(RUSAGE_SELF)``; child
    processes such as the moto server are not included)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def settle(pid: int | None, quiet: float = 0.05, timeout: float = 30.0, interval: float = 0.5) -> None:
    """Wait until process ``pid`` (a storage server) is idle: under ``quiet`` CPU-seconds per ``interval``."""
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    last = cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = cpu_seconds(pid)
        if now - last < quiet:
            return
        last = now


def load_average() -> float | None:
    """The 1-minute load average (None where the OS does not tell)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, tokens: torch.Tensor) -> float:
    """One forward/backward/optimizer step of next-token prediction on ``tokens`` (batch, seq)."""
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def make_tokens(batch: int = 2, seq: int = 64, vocab: int = 32000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq + 1), generator=g)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_bytes(*objs) -> int:
    total = 0
    for o in objs:
        sd = o.state_dict()
        stack = [sd]
        while stack:
            x = stack.pop()
            if isinstance(x, torch.Tensor):
                total += x.numel() * x.element_size()
            elif isinstance(x, dict):
                stack.extend(x.values())
            elif isinstance(x, (list, tuple)):
                stack.extend(x)
    return total


def timeit(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples), "n": len(samples)}


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print(f"\n{title}")
    print("  ".join(c.ljust(widths[c]) for c in columns))
    print("  ".join("-" * widths[c] for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    payload = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_1min": load_average(),
        },
        **payload,
    }
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path


def servers_module():
    """tests/servers.py (MotoS3Server, FakeGcsServer), imported from the tests folder."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    import servers

    return servers


def pin_server(pid: int | None, cpus: set[int] | None) -> None:
    """Pin every thread of the server process (threads it starts later inherit the mask); None: leave it."""
    if pid is None or not cpus:
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), cpus)


def split_cpus(isolate: bool) -> tuple[set[int] | None, set[int] | None]:
    """(the server's CPUs, the benchmark's): with ``isolate`` and more than one CPU, the last one for the server."""
    cpus = sorted(os.sched_getaffinity(0))
    return ({cpus[-1]}, set(cpus[:-1])) if isolate and len(cpus) > 1 else (None, None)


def isolate_benchmark(isolate: bool) -> set[int] | None:
    """With ``isolate``: this process (and the threads it starts from now on) off the last CPU, which is returned
    for the server (:func:`pin_server`); None when not isolating or with one CPU."""
    server_cpus, bench_cpus = split_cpus(isolate)
    if bench_cpus:
        os.sched_setaffinity(0, bench_cpus)
        torch.set_num_threads(len(bench_cpus))
    return server_cpus


class MotoProcess:
    """tests/servers.MotoS3Server run in a child process.

    In-process, moto would share the benchmark's GIL and turn every upload into Python work on the measured
    process; a real object store is on another machine. Here it still shares the CPUs (see the README).
    """

    def __init__(self, tls: bool = False) -> None:
        servers = servers_module()
        certs = servers.self_signed_cert(Path(tempfile.mkdtemp(prefix="moto-tls-"))) if tls else None
        self._server = servers.MotoS3Server(port=servers.free_port(), tls=certs)
        self._proc: subprocess.Popen | None = None

    @property
    def endpoint_url(self) -> str:
        return self._server.endpoint_url

    def start(self, timeout: float = 60.0) -> MotoProcess:
        code = (
            f"import sys; sys.path.insert(0, {str(TESTS)!r}); from servers import MotoS3Server; "
            f"from pathlib import Path; tls = {[str(p) for p in self._server.tls] if self._server.tls else None!r}; "
            f"MotoS3Server(port={self._server.port}, tls=tls and tuple(map(Path, tls))).start(); "
            "print('ready', flush=True); sys.stdin.read()"
        )
        self._proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self._proc.stdout.readline() if self._proc.stdout else b""
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError(f"moto did not start on {self.endpoint_url}")
        deadline = time.monotonic() + timeout
        while True:  # the server thread may still be binding when the child says ready
            try:
                self._server.create_bucket(BUCKET)
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.stop()
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def options(self) -> dict[str, Any]:
        """s3fs options for this server. moto's CompleteMultipartUpload joins and re-hashes a GB object in Python:
        on a busy 2-core machine that outlasts botocore's 60 s read timeout, and the retried request races the
        first one (moto then answers 500 "seek of closed file", then NoSuchUpload). A real S3 answers in
        seconds; a long read timeout keeps the emulator from failing uploads, for every method alike."""
        options = self._server.options()
        options["config_kwargs"] = {"read_timeout": 900}
        return options

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None


@contextmanager
def moto_s3(tls: bool = False) -> Iterator[MotoProcess]:
    """A moto S3 server in a child process with bucket ``BUCKET``; ``tls``: over https, with a private CA that
    :meth:`MotoProcess.options` trust (every client alike)."""
    server = MotoProcess(tls).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def fake_gcs() -> Iterator[Any]:
    """fake-gcs-server (memory backend) with bucket ``BUCKET``."""
    server = servers_module().FakeGcsServer().start()
    try:
        server.create_bucket(BUCKET)
        yield server
    finally:
        server.stop()


def unique_prefix(scheme: str, what: str) -> str:
    """A run URL under the benchmark bucket that no other run uses."""
    return f"{scheme}://{BUCKET}/{what}-{uuid.uuid4().hex[:8]}"


def cpu_seconds(pid: int | None = None, *, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default), or of one thread of this process, from /proc."""
    with open(f"/proc/self/task/{tid}/stat" if tid is not None else f"/proc/{pid or 'self'}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def committed_checkpoint(directory: Path, layers: int, step: int = 1) -> tuple[Path, dict[str, Any]]:
    """Build the benchmark model and commit one local syncckpt checkpoint of it under ``directory``.

    Returns the checkpoint folder and facts about it; the model is dropped again so its memory is free.
    """
    from syncckpt import CheckpointManager

    model, opt = build_model(layers=layers)
    info = {"params": n_params(model), "state_bytes": state_bytes(model, opt)}
    with CheckpointManager(directory, save_every_n_steps=None, handle_sigterm=False) as mgr:
        mgr.register(model=model, optimizer=opt)
        mgr.save(step, epoch=0, batch_idx=step - 1)
        mgr.wait()
    folder = Path(directory) / f"checkpoint-step-{step}"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    info.update(files=len(files), bytes=sum(p.stat().st_size for p in files))
    return folder, info


def tree_bytes(fs: Any, path: str) -> int:
    """Total size of the objects under ``path`` in an fsspec filesystem (listing caches bypassed)."""
    fs.invalidate_cache()
    return sum(int(v.get("size") or 0) for v in fs.find(path, detail=True).values())
