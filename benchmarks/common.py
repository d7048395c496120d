"""Shared pieces of the benchmarks: a >= 100M-parameter transformer with AdamW state, timing, table output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("results")


def build_model(d_model: int = 768, layers: int = 12, vocab: int = 32000) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A GPT-style stack (~110M parameters at the defaults) whose AdamW state is populated by one step."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(d_model, nhead=12, dim_feedforward=4 * d_model, batch_first=True)
    model = torch.nn.Sequential(
        torch.nn.Embedding(vocab, d_model),
        torch.nn.TransformerEncoder(layer, num_layers=layers, enable_nested_tensor=False),
        torch.nn.Linear(d_model, vocab, bias=False),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


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
    payload = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
               **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
