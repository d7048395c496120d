"""Data pipelines that take part in exact resume: stateful loaders, streamed datasets, and the count fallback.

:class:`syncckpt.ResumableSampler` covers a map-style dataset. Everything else joins through the resume hooks of
:mod:`syncckpt.restore`:

- **A stateful loader** (torchdata's ``StatefulDataLoader``) can be registered as it is,
  ``mgr.register(loader=loader)``: its ``state_dict()`` (sampler position, per-worker dataset states, worker seed)
  is plain data and tensors, so it round-trips through safetensors + JSON; a leaf that is neither is refused at
  the save with the key path named (``StateNotSerializable``). The resumed pass continues exactly, with any
  ``num_workers``. Registered bare, the main process's RNG streams are restored by ``resume()``, before the
  loader's next pass draws its worker seed from the global generator (as every DataLoader pass does); the
  uninterrupted run drew it at the start of the epoch, so dropout after the resume differs. Wrap it in
  :class:`ResumableLoader` (or register a :class:`~syncckpt.ResumableSampler` too) and the streams are re-applied
  after that draw: bit-identical.
- **A streamed dataset with state** (a Hugging Face ``datasets.IterableDataset``, local or remote files, after
  ``split_dataset_by_node`` too) resumes through its own ``state_dict()``: it reopens the shard it was in and skips
  within it; consumed shards are not read again. Its ``shuffle(buffer_size=...)`` loses the buffer on resume
  (``datasets`` refills it, so examples are skipped): use :class:`ShuffleBuffer` instead, whose state holds the
  buffer's examples (the checkpoint grows by ``buffer_size`` examples per worker).
- **A stream without state** (a plain ``torch.utils.data.IterableDataset``): :class:`ResumableLoader` skips the
  batches already trained by reading them again, with a progress bar and a warning that says what it costs.

>>> import tempfile, torch
>>> from torch.utils.data import DataLoader, IterableDataset
>>> from syncckpt import CheckpointManager
>>> class Stream(IterableDataset):
...     def __iter__(self): return iter(range(10))
>>> loader = ResumableLoader(DataLoader(Stream(), batch_size=2))
>>> with CheckpointManager(tempfile.mkdtemp(), handle_sigterm=False) as mgr:
...     mgr.register(model=torch.nn.Linear(1, 1), loader=loader)
...     mgr.save(2, epoch=0, batch_idx=1)  # two batches trained
...     _ = mgr.wait()
...     fresh = ResumableLoader(DataLoader(Stream(), batch_size=2), progress=False)
...     mgr.register(loader=fresh); _ = mgr.resume()
>>> [b.tolist() for b in fresh]  # the resumed pass skipped (by reading) the two trained batches
[[4, 5], [6, 7], [8, 9]]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

log = logging.getLogger("syncckpt")

__all__ = ["ResumableLoader", "ShuffleBuffer", "has_state"]


def has_state(obj: Any) -> bool:
    """Whether ``obj`` saves and restores its own position (``state_dict`` and ``load_state_dict``).

    >>> has_state(torch.nn.Linear(1, 1)), has_state(range(3))
    (True, False)
    """
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class ResumableLoader:
    """A DataLoader that takes part in exact resume, registered with the manager like any object.

    - Around a stateful loader (``StatefulDataLoader`` over a dataset that has state, or over a map-style
      dataset), the state is the loader's own ``state_dict()``, and the RNG streams are re-applied when the resumed
      pass begins, after the loader drew its worker seed.
    - Around any other loader, in particular one over a plain ``IterableDataset`` without state, the position is
      the count of batches the loop trained (the manager's ``batch_idx``): the resumed pass reads those batches
      again and drops them, with a ``tqdm`` progress bar and a warning naming the cost (every skipped sample is
      loaded and transformed again, in the time that takes). Nothing is skipped silently.

    Iterate it as you would the loader; ``len()`` and attribute access go to the loader.

    >>> from torchdata.stateful_dataloader import StatefulDataLoader
    >>> loader = ResumableLoader(StatefulDataLoader(list(range(6)), batch_size=2))
    >>> it = iter(loader); _ = next(it); state = loader.state_dict()
    >>> again = ResumableLoader(StatefulDataLoader(list(range(6)), batch_size=2)); again.load_state_dict(state)
    >>> [b.tolist() for b in again]
    [[2, 3], [4, 5]]
    """

    syncckpt_per_rank = True  # each rank's loader is at its own place in its own part of the data

    def __init__(self, loader: Iterable[Any], *, progress: bool = True) -> None:
        self.loader = loader
        self.progress = progress
        dataset = getattr(loader, "dataset", None)
        self.stateful = has_state(loader) and not (isinstance(dataset, IterableDataset) and not has_state(dataset))
        self._skip = 0
        self._on_resume: Callable[[], None] | None = None

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)  # the loader draws its worker seed here, from the global RNG
        skip, self._skip = self._skip, 0
        if skip:
            it = self._skip_by_reading(it, skip)
        hook, self._on_resume = self._on_resume, None
        if hook is not None:
            hook()
        return it

    def __len__(self) -> int:
        return len(self.loader) - self._skip  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("loader", "progress", "stateful", "_skip", "_on_resume"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _skip_by_reading(self, it: Iterator[Any], count: int) -> Iterator[Any]:
        from tqdm.auto import tqdm

        from ._bars import progress

        start = time.monotonic()
        with progress(tqdm, total=count, desc="syncckpt: skipping trained batches", disable=not self.progress) as bar:
            for done in range(count):
                try:
                    next(it)
                except StopIteration:
                    log.warning("ResumableLoader: the stream ended after %d of the %d batches to skip", done, count)
                    break
                bar.update()
        log.info("ResumableLoader: skipped %d batches in %.1f s", count, time.monotonic() - start)
        return it

    # -- checkpoint protocol -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The loader's own state (stateful), or ``{"skip_by_count": True}`` (the position is added at the save)."""
        if self.stateful:
            return self.loader.state_dict()  # type: ignore[attr-defined]
        return {"skip_by_count": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the loader's state, or arm the count skip for the next pass."""
        if not state.get("skip_by_count"):
            if not self.stateful:
                raise ValueError(
                    "ResumableLoader: the checkpoint holds a stateful loader's state but this loader has none; "
                    "build the same loader as the run that saved it"
                )
            self.loader.load_state_dict(state)  # type: ignore[attr-defined]
            return
        if self.stateful:
            raise ValueError(
                "ResumableLoader: the checkpoint counted batches (a loader without state) but this loader has "
                "state; build the same loader as the run that saved it"
            )
        pos = state.get("position") or {}
        self._skip = int(pos.get("batch_idx", -1)) + 1
        if self._skip:
            log.warning(
                "ResumableLoader: %s over %s has no state_dict: the resumed pass skips %d trained batches by "
                "reading them again (every sample of them is loaded and transformed; no training). A dataset with "
                "state_dict/load_state_dict, or a map-style dataset with ResumableSampler, skips without reading",
                type(self.loader).__name__,
                type(getattr(self.loader, "dataset", None)).__name__,
                self._skip,
            )

    def checkpoint_position(self, epoch: int, batch_idx: int) -> dict[str, Any]:
        """The count fallback's position: batches of ``epoch`` trained (a stateful loader saves its own)."""
        return {} if self.stateful else {"position": {"epoch": epoch, "batch_idx": batch_idx}}

    def on_resumed_pass(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` when the resumed pass begins, after the loader drew its worker seed."""
        self._on_resume = hook


class ShuffleBuffer(IterableDataset):
    """A shuffle buffer over a stateful stream whose state holds the buffer, so a resume loses no example.

    ``source`` is any iterable with ``state_dict``/``load_state_dict`` (a Hugging Face ``IterableDataset``, also
    after ``split_dataset_by_node``; ``datasets``' own ``shuffle(buffer_size=...)`` refills its buffer on resume and
    so skips examples). Each DataLoader worker shuffles its own part of the stream with a generator seeded by
    ``(seed, epoch, worker id)``. The state is the source's state, the buffer's examples and the generator's state:
    ``buffer_size`` examples per worker in every checkpoint, which is the price of exactness.

    >>> import datasets
    >>> src = datasets.IterableDataset.from_generator(lambda: ({"i": i} for i in range(8)))
    >>> a = ShuffleBuffer(src, buffer_size=4, seed=1); full = [x["i"] for x in a]
    >>> it = iter(a); head = [next(it)["i"] for _ in range(3)]; state = a.state_dict()
    >>> b = ShuffleBuffer(src, buffer_size=4, seed=1); b.load_state_dict(state)
    >>> head + [x["i"] for x in b] == full, sorted(full) == list(range(8))
    (True, True)
    """

    syncckpt_per_rank = True  # each rank's buffer holds examples of its own part of the stream

    def __init__(self, source: Any, buffer_size: int, seed: int = 0) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if not has_state(source):
            raise TypeError(
                f"ShuffleBuffer needs a source with state_dict/load_state_dict, got {type(source).__name__}"
            )
        self.source = source
        self.buffer_size = buffer_size
        self.seed = seed
        self.epoch = 0
        self._loaded: dict[str, Any] | None = None
        self._live: dict[str, Any] | None = (
            None  # the running pass: buffer, generator, source state before the first pull
        )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (the shuffle order and the source's own epoch); call it before every epoch."""
        self.epoch = int(epoch)
        if callable(getattr(self.source, "set_epoch", None)):
            self.source.set_epoch(self.epoch)

    def __iter__(self) -> Iterator[Any]:
        loaded, self._loaded = self._loaded, None
        if loaded is not None and int(loaded["epoch"]) == self.epoch:
            rng = np.random.default_rng()
            rng.bit_generator.state = loaded["rng"]
            buffer = list(loaded["buffer"])
            if loaded["source"] is not None:
                self.source.load_state_dict(loaded["source"])
            source_state = loaded["source"]
        else:
            info = torch.utils.data.get_worker_info()
            rng = np.random.default_rng([self.seed, self.epoch, info.id if info is not None else 0])
            buffer, source_state = [], None
        self._live = {"rng": rng, "buffer": buffer, "source": source_state, "pulled": False}
        return self._run(self._live)

    def _run(self, live: dict[str, Any]) -> Iterator[Any]:
        buffer, rng = live["buffer"], live["rng"]
        for example in self.source:
            live["pulled"] = True
            if len(buffer) < self.buffer_size:
                buffer.append(example)
                continue
            i = int(rng.integers(len(buffer)))
            out, buffer[i] = buffer[i], example
            yield out
        live["pulled"] = True
        while buffer:
            yield buffer.pop(int(rng.integers(len(buffer))))

    def state_dict(self) -> dict[str, Any]:
        """Where this copy of the stream is: the source's state, the buffer's examples, the generator's state."""
        live = self._live
        if live is None:
            return {"epoch": self.epoch, "source": None, "buffer": [], "rng": None}
        source = self.source.state_dict() if live["pulled"] else live["source"]
        return {
            "epoch": self.epoch,
            "source": source,
            "buffer": list(live["buffer"]),
            "rng": live["rng"].bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume the next pass of ``state["epoch"]`` where the saved one was."""
        self._live = None
        self._loaded = state if state.get("rng") is not None else None
