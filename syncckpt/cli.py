"""The ``syncckpt`` command: list, verify, pull, push, prune and mirror checkpoints from a shell.

A URL argument is either a plain path (a local folder) or a remote run URL: ``s3://bucket/runs/a``,
``gs://bucket/runs/a``, ``hf://user/repo``, ``file:///mnt/share/run``, any fsspec URL. Where one checkpoint is
meant, the URL may end in its name (``s3://bucket/runs/a/checkpoint-step-500``). ``file://`` URLs take the remote
code path (the folder is treated as a mirror); plain paths take the local one.

Subcommands (each accepts ``--json``)::

    syncckpt ls checkpoints/ [--remote s3://bucket/runs/a]
        Checkpoints, newest first: checkpoint, kind, step, epoch, size, created (UTC), healthy (no non-finite
        weights when saved; ls reads no data, use verify) and mirrored (the remote named by --remote holds an
        identical manifest; always "yes" when listing a remote run; "-" when unknown). Quarantined checkpoints
        (ones that failed verification at a resume, kept aside: see syncckpt.quarantine) follow the table, one
        "QUARANTINED  NAME: reason" line each.

    syncckpt verify s3://bucket/runs/a[/checkpoint-step-500]
        Check every file of one checkpoint (or of every checkpoint of a run or folder) against the SHA-256
        manifest. Remote checkpoints are downloaded, one at a time, into a temporary folder under $TMPDIR that is
        removed afterwards. Prints "ok" or "INVALID" with the file and the reason, per checkpoint. Quarantined
        checkpoints are reported as QUARANTINED with the reason found then (not downloaded again) and count as
        invalid.

    syncckpt pull s3://bucket/runs/a checkpoints/ [--checkpoint NAME|latest]
        Download a checkpoint (default: the newest valid one, in resume order) into checkpoints/NAME, digests
        checked while the bytes arrive; the folder appears only once complete. A copy already there with the same
        manifest is verified instead of downloaded again. CheckpointManager("checkpoints/").resume() then finds it.

    syncckpt push output/checkpoint-500 s3://bucket/runs/a [--takeover]
        Mirror a checkpoint folder: data files, then manifest.json, then LATEST (only when the checkpoint is newer
        than the one LATEST names). A folder without manifest.json but with a checkpoint name (a transformers
        ``checkpoint-N``, ``checkpoint-step-N``, ...) gets one first (written into the folder). A folder of
        checkpoints pushes each complete one (manifest.json or trainer_state.json present), oldest first.
        Checkpoints of ours are verified before they are pushed; one the remote already holds is skipped.

    syncckpt prune s3://bucket/runs/a --keep-last 2 [--keep-epochs 3] [--dry-run]
        Delete all but the newest N step checkpoints (and M epoch checkpoints; all are kept without
        --keep-epochs) from a local folder or a remote run. best_model and the newest healthy checkpoint are
        always kept. A checkpoint kept in place of a deleted one is verified first; one that fails takes no
        slot and is quarantined, not deleted, so a valid checkpoint is never deleted while an invalid newer one
        is kept. Quarantined checkpoints are neither counted nor deleted. Prints what is (or would be) deleted.

    syncckpt rm s3://bucket/runs/a/checkpoint-step-500 [--force]
        Delete one checkpoint (manifest first, then its files) and its quarantined copies; on a remote run,
        LATEST then names the newest remaining checkpoint. Deleting the last valid checkpoint (the one named
        verifies and no other does) is refused without --force.

    syncckpt watch output/ s3://bucket/runs/a [--interval 30] [--settle 30] [--keep-last 2] [--once]
        A sidecar that mirrors what any trainer writes into output/, without touching the training code:

        - syncckpt folders: complete when manifest.json is there (it is written last).
        - transformers ``checkpoint-N`` folders: complete when trainer_state.json is there and no file in the
          folder changed for --settle seconds; a manifest.json is then written into the folder.
        - Lightning ``*.ckpt`` files in output/ itself: complete when the file did not change for --settle
          seconds. Each is copied (never hard-linked: Lightning rewrites ``last.ckpt`` in place) into
          ``output/.syncckpt/checkpoint-step-N/`` and mirrored as that checkpoint, the file keeping its name with
          characters outside ``[A-Za-z0-9_.-]`` replaced by ``_``. N is the ``step=N`` of the file name; a file
          without one (``last.ckpt``) gets N = 1 + the highest step seen so far locally or on the remote, so it
          sorts as the newest. Its source name, size and mtime are kept in the manifest's ``extra``, so a file
          already mirrored is not mirrored again after a restart. The local copy is removed once queued.

        Checkpoints the remote already holds (identical manifest) are not uploaded again. Uploads run in the
        background; like the trainer's own mirroring, a step checkpoint that is superseded before its upload
        starts is skipped. --keep-last (and --keep-epochs) apply retention to the remote after each upload; the
        local folder is left to the trainer. --once does one scan, uploads every complete checkpoint found
        (waiting after each, so none is skipped), and exits. SIGINT/SIGTERM stop it after the queued uploads are
        flushed; a second signal stops it at once.

Global options (before or after the subcommand):

    --json                       machine-readable JSON on stdout (one object; watch without --once prints one
                                 JSON line per event); errors also as {"error": ..., "exit_code": ...}
    --storage-option KEY=VALUE   passed to the store (repeatable); VALUE is JSON-decoded where it is valid JSON,
                                 e.g. --storage-option 'client_kwargs={"endpoint_url": "http://127.0.0.1:9000"}'.
                                 Values are never printed: any that shows up in a message is replaced by ***.
    --verbose                    log what happens on stderr (down to DEBUG), with tracebacks of errors

Progress bars (tqdm) go to stderr, and only when it is a terminal.

Exit codes::

    0  ok
    1  verification failed, or something invalid was found (a corrupt checkpoint, a manifest that does not parse)
    2  usage or access error (bad arguments, missing path, unknown URL scheme, no checkpoint there, store errors,
       another session holds the run's lease, watch stopped before its uploads finished)
    130 interrupted (Ctrl-C) outside watch

Errors are reported in one line on stderr, ``syncckpt: error: ...``, without a traceback.

>>> main(["--help"])  # doctest: +ELLIPSIS
usage: syncckpt ...
0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tqdm import tqdm

from . import local, quarantine
from .errors import CheckpointCorrupt, CheckpointNotFound, RemoteError, SyncCkptError
from .lease import Lease
from .manifest import MANIFEST_NAME, Manifest, parse_checkpoint_name, same_content
from .pull import pull, remote_listing, split_checkpoint_url
from .remote import Remote, open_remote
from .resume import repoint_latest
from .retention import Ref, next_latest, plan_deletions, recency
from .select import order_candidates

log = logging.getLogger("syncckpt")

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2

TRAINER_STATE = "trainer_state.json"  # transformers writes it into every checkpoint-N folder
STAGE_DIR = ".syncckpt"  # watch's own folder inside the watched one (Lightning wrappers)

_USERINFO = re.compile(r"://[^/\s@]*@")
_STEP_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])step=(\d+)")
_EPOCH_IN_NAME = re.compile(r"(?:^|[^A-Za-z0-9])epoch=(\d+)")
_ODD_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


class UsageError(SyncCkptError):
    """A command line that parsed but makes no sense (exit status 2)."""


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


# ---- entry point ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``syncckpt`` command; returns the exit status (0 ok, 1 invalid, 2 usage or access error).

    >>> main(["ls", "/no/such/folder"])
    2
    """
    parser = _build_parser()
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(args_list)
    except _Exit as e:  # usage errors (already reported in one line)
        return e.code
    except SystemExit as e:  # --help
        return int(e.code or 0)
    as_json = bool(args.json)
    try:
        options = _parse_storage_options(list(args.storage_option or []) + list(args.storage_option_sub or []))
    except UsageError as e:
        _report_error(str(e), EXIT_USAGE, as_json, _Scrubber({}, args_list))
        return EXIT_USAGE
    scrub = _Scrubber(options, args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    ctx = _Context(options=options, as_json=as_json, verbose=bool(args.verbose), scrub=scrub)
    with _logging_to_stderr(ctx):
        try:
            return args.func(args, ctx)
        except KeyboardInterrupt:
            _report_error("interrupted", 130, as_json, scrub)
            return 130
        except CheckpointNotFound as e:  # a FileNotFoundError too: "nothing there" is an access error
            return _fail(e, EXIT_USAGE, ctx)
        except CheckpointCorrupt as e:
            return _fail(e, EXIT_INVALID, ctx)
        except (SyncCkptError, OSError, ValueError) as e:
            return _fail(e, EXIT_USAGE, ctx)


# ---- plumbing -------------------------------------------------------------------------------------------------------
@dataclass
class _Context:
    options: dict[str, Any]
    as_json: bool
    verbose: bool
    scrub: _Scrubber

    def emit(self, obj: dict[str, Any], text: str | None) -> None:
        """The result of a command: JSON or text on stdout, never carrying a storage option value."""
        line = json.dumps(obj, sort_keys=True) if self.as_json else text
        if line is not None:
            print(self.scrub(line), flush=True)

    def open(self, url: str) -> Remote:
        return open_remote(url, self.options or None)


class _Scrubber:
    """Replaces every storage option value, and URL credentials, by *** in text meant for humans or logs."""

    def __init__(self, options: dict[str, Any], argv: Sequence[str]) -> None:
        found: set[str] = set()

        def walk(obj: Any) -> None:
            if isinstance(obj, dict):
                for v in obj.values():
                    walk(v)
            elif isinstance(obj, (list, tuple)):
                for v in obj:
                    walk(v)
            elif isinstance(obj, (str, int, float)) and not isinstance(obj, bool) and len(str(obj)) >= 4:
                found.add(str(obj))

        walk(options)
        for arg in argv:
            if "://" in arg:
                s = urlsplit(arg)
                found.update(v for v in (s.username, s.password, s.query) if v and len(v) >= 4)
        self._secrets = sorted(found, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return _USERINFO.sub("://", text)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not argparse's usage dump
        print(f"syncckpt: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise _Exit(EXIT_USAGE)


def _fail(e: BaseException, code: int, ctx: _Context) -> int:
    if ctx.verbose:
        log.debug("Details", exc_info=e)
    _report_error(str(e) or type(e).__name__, code, ctx.as_json, ctx.scrub)
    return code


def _report_error(message: str, code: int, as_json: bool, scrub: Callable[[str], str]) -> None:
    message = scrub(" ".join(message.split()))  # one line
    if as_json:
        print(json.dumps({"error": message, "exit_code": code}), flush=True)
    print(f"syncckpt: error: {message}", file=sys.stderr, flush=True)


class _ScrubbingFormatter(logging.Formatter):
    def __init__(self, scrub: Callable[[str], str], verbose: bool) -> None:
        super().__init__()
        self._scrub = scrub
        self._verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        text = f"syncckpt: {record.levelname.lower()}: {record.getMessage()}"
        if self._verbose and record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return self._scrub(text)


@contextmanager
def _logging_to_stderr(ctx: _Context) -> Iterator[None]:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ScrubbingFormatter(ctx.scrub, ctx.verbose))
    old_level = log.level
    log.setLevel(logging.DEBUG if ctx.verbose else logging.WARNING)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def _parse_storage_options(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            # The value is never echoed: it may be a secret.
            raise UsageError(f"--storage-option expects KEY=VALUE, got {key.strip()!r} without '='")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out


def _is_remote(url: str) -> bool:
    return "://" in url


def _split(url: str) -> tuple[str, str | None]:
    """(run, checkpoint name or None) for a remote URL or a plain path."""
    if _is_remote(url):
        return split_checkpoint_url(url)
    p = Path(url)
    if parse_checkpoint_name(p.name) is not None:
        return str(p.parent), p.name
    return url, None


@contextmanager
def _remote(ctx: _Context, url: str) -> Iterator[Remote]:
    remote = ctx.open(url)
    try:
        yield remote
    finally:
        remote.close()


def _check_name(name: str, what: str) -> str:
    if parse_checkpoint_name(name) is None:
        raise UsageError(f"{what} {name!r} is not a checkpoint name (checkpoint-step-N, checkpoint-epoch-N, "
                         "checkpoint-N or best_model)")
    return name


def _human_size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    size = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        size /= 1000
        if size < 1000 or unit == "TB":
            break
    return f"{size:.1f} {unit}"


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]]
    return "\n".join(lines)


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, file=sys.stderr, disable=None, leave=False)


def _ref(name: str, kind: str, global_step: int, epoch: int = 0, healthy: bool = True) -> Ref:
    return Ref(name, kind, global_step, epoch, healthy)


def _keep_epochs(value: int | None) -> int:
    return value if value is not None else 1 << 30  # without --keep-epochs every epoch checkpoint stays


# ---- ls -------------------------------------------------------------------------------------------------------------
def _cmd_ls(args: argparse.Namespace, ctx: _Context) -> int:
    rows: list[dict[str, Any]] = []
    if args.remote and _is_remote(args.url):
        raise UsageError("--remote compares a local folder with a remote run; URL is remote already")
    if _is_remote(args.url):
        run_url, only = split_checkpoint_url(args.url)
        with _remote(ctx, run_url) as remote:
            url = remote.url
            listing = remote_listing(remote, strict=True)
        for name, m in listing.manifests.items():
            if only is None or name == only:
                rows.append(_row(m, mirrored=True))
        held = [q for q in listing.quarantined if only is None or q.name == only]
        if only is not None and not rows and not held:
            raise CheckpointNotFound(f"{url}/{only}: no such checkpoint")
    else:
        path = Path(args.url)
        if not path.is_dir():
            raise CheckpointNotFound(f"{path}: no such folder")
        url = str(path)
        if (path / MANIFEST_NAME).exists():
            m, digest = local.read_manifest(path)
            checkpoints = [local.LocalCheckpoint(path.name, path, m, digest)]
        else:
            checkpoints = local.list_checkpoints(path)
        held = quarantine.list_local(path)
        remote_manifests: dict[str, Manifest] | None = None
        if args.remote:
            with _remote(ctx, args.remote) as remote:
                remote_manifests = remote_listing(remote, strict=True).manifests
        for c in checkpoints:
            mirrored = None
            if remote_manifests is not None:
                theirs = remote_manifests.get(c.name)
                mirrored = theirs is not None and same_content(theirs, c.manifest)
            rows.append(_row(c.manifest, mirrored=mirrored))
    rows.sort(key=lambda r: recency(_ref(r["name"], r["kind"], r["global_step"])), reverse=True)
    yes_no = {True: "yes", False: "no", None: "-"}
    table = _table(
        ["checkpoint", "kind", "step", "epoch", "size", "created", "healthy", "mirrored"],
        [[r["name"], r["kind"], str(r["global_step"]), str(r["epoch"]), _human_size(r["size"]), r["created_iso"],
          yes_no[r["healthy"]], yes_no[r["mirrored"]]] for r in rows],
    )
    text = table if rows else f"no checkpoints in {url}"
    if held:
        text += "\n" + "\n".join(_quarantine_line(q) for q in held)
    ctx.emit({"url": url, "checkpoints": rows, "quarantined": [dataclasses.asdict(q) for q in held]}, text)
    return EXIT_OK


def _quarantine_line(q: quarantine.Quarantined) -> str:
    kept = f" (kept as {q.where})" if q.location == "local" else ""
    return f"QUARANTINED  {q.name}: {q.reason}{kept}"


def _row(m: Manifest, mirrored: bool | None) -> dict[str, Any]:
    return {"name": m.name, "kind": m.kind, "global_step": m.global_step, "epoch": m.epoch,
            "batch_idx": m.batch_idx, "size": m.total_size, "files": len(m.files), "created": m.created,
            "created_iso": _iso(m.created), "healthy": m.healthy, "mirrored": mirrored}


# ---- verify ---------------------------------------------------------------------------------------------------------
@dataclass
class _Checked:
    name: str
    error: str | None
    files: int = 0
    size: int = 0


def _cmd_verify(args: argparse.Namespace, ctx: _Context) -> int:
    results: list[_Checked] = []
    held: list[quarantine.Quarantined] = []
    if _is_remote(args.url):
        run_url, name = split_checkpoint_url(args.url)
        with _remote(ctx, run_url) as remote:
            url = remote.url if name is None else f"{remote.url}/{name}"
            if name is None:  # quarantined ones were verified before: reported, not downloaded again
                listing = remote_listing(remote, strict=True)
                held = listing.quarantined
                names = sorted([*listing.manifests, *listing.unreadable])
            else:
                names = [name]
            if not names and not held:
                raise CheckpointNotFound(f"{remote.url}: no checkpoints there")
            for n in names:
                results.append(_verify_remote(remote, n, explicit=name is not None))
    else:
        path = Path(args.url)
        url = str(path)
        if not path.exists():
            raise CheckpointNotFound(f"{path}: no such file or folder")
        if not path.is_dir():
            raise UsageError(f"{path}: not a folder; pass a checkpoint folder or a folder of checkpoints")
        if (path / MANIFEST_NAME).exists() or parse_checkpoint_name(path.name) is not None:
            folders = [path]
        else:
            folders = sorted(p for p in path.iterdir() if p.is_dir() and parse_checkpoint_name(p.name) is not None)
            held = quarantine.list_local(path)
            if not folders and not held:
                raise CheckpointNotFound(f"{path}: no checkpoints there")
        results = [_verify_local(p, ctx) for p in folders]
    lines = []
    for r in results:
        if r.error is None:
            lines.append(f"ok       {r.name} ({r.files} files, {_human_size(r.size)})")
        else:
            lines.append(f"INVALID  {r.name}: {r.error}")
    lines += [_quarantine_line(q) for q in held]
    bad = [r for r in results if r.error is not None]
    total, invalid = len(results) + len(held), len(bad) + len(held)
    summary = f"{invalid} of {total} checkpoints INVALID" if invalid else f"all {total} valid"
    lines.append(summary + (f" ({len(held)} quarantined earlier)" if held else ""))
    ctx.emit({"url": url, "valid": not invalid,
              "checkpoints": [{"name": r.name, "valid": r.error is None, "error": r.error, "files": r.files,
                               "size": r.size} for r in results],
              "quarantined": [dataclasses.asdict(q) for q in held]},
             "\n".join(lines))
    return EXIT_INVALID if invalid else EXIT_OK


def _verify_local(path: Path, ctx: _Context) -> _Checked:
    try:
        manifest, _ = local.read_manifest(path)
        if any(f.parts for f in manifest.files):  # a mirror of an incrementally mirrored run, named by its path
            with _remote(ctx, str(path.parent)) as remote:
                return _verify_remote(remote, path.name, explicit=True)
        local.verify(path)
    except CheckpointCorrupt as e:
        return _Checked(path.name, str(e))
    return _Checked(path.name, None, len(manifest.files), manifest.total_size)


def _verify_remote(remote: Remote, name: str, explicit: bool) -> _Checked:
    where = f"{remote.url}/{name}"
    try:
        manifest, _ = remote.read_manifest(name)
    except FileNotFoundError:
        if explicit:
            raise CheckpointNotFound(f"{where}: no such checkpoint (no {MANIFEST_NAME})") from None
        return _Checked(name, f"{where}/{MANIFEST_NAME}: missing")
    except CheckpointCorrupt as e:
        return _Checked(name, str(e))
    with tempfile.TemporaryDirectory(prefix="syncckpt-verify-") as tmp, _bar(manifest.total_size, name) as bar:
        try:
            remote.download_checkpoint(name, manifest, Path(tmp), progress=bar.update)
        except (CheckpointCorrupt, FileNotFoundError) as e:
            msg = str(e)
            return _Checked(name, msg if msg.startswith(remote.url) else f"{where}/{msg}")
    return _Checked(name, None, len(manifest.files), manifest.total_size)


# ---- pull -----------------------------------------------------------------------------------------------------------
def _cmd_pull(args: argparse.Namespace, ctx: _Context) -> int:
    run_url, name = _split(args.url)
    if args.checkpoint and args.checkpoint != "latest":
        name = _check_name(args.checkpoint, "--checkpoint")
    elif args.checkpoint == "latest":
        name = None
    dest = Path(args.dest)
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest}: exists and is not a folder")
    with _remote(ctx, run_url) as remote:
        url = remote.url
        if name is not None:
            try:
                manifest, _ = remote.read_manifest(name)
            except FileNotFoundError:
                raise CheckpointNotFound(f"{remote.url}/{name}: no such checkpoint (no {MANIFEST_NAME})") from None
            tries = [(name, manifest)]
        else:
            listing = remote_listing(remote, strict=True)
            cands, manifests = listing.candidates, listing.manifests
            if not cands:
                raise CheckpointNotFound(f"{remote.url}: no checkpoints there")
            tries = [(c.name, manifests[c.name]) for c in order_candidates(cands)]
        errors = []
        for n, manifest in tries:
            try:
                path, fetched = _pull_one(remote, n, manifest, dest)
            except CheckpointCorrupt as e:
                if name is not None:
                    raise
                log.warning("Skipping %s/%s: %s", remote.url, n, e)
                errors.append(f"{n}: {e}")
                continue
            verb = "pulled" if fetched else "already present (verified)"
            ctx.emit({"url": remote.url, "checkpoint": n, "path": str(path), "global_step": manifest.global_step,
                      "files": len(manifest.files), "size": manifest.total_size, "downloaded": fetched},
                     f"{verb}: {n} (step {manifest.global_step}, {len(manifest.files)} files, "
                     f"{_human_size(manifest.total_size)}) -> {path}")
            return EXIT_OK
    raise CheckpointCorrupt(f"{url}: no valid checkpoint there; " + "; ".join(errors))


def _pull_one(remote: Remote, name: str, manifest: Manifest, dest: Path) -> tuple[Path, bool]:
    existing = dest / name
    if (existing / MANIFEST_NAME).exists():
        try:
            mine, _ = local.read_manifest(existing)
            if same_content(mine, manifest):
                local.verify(existing)
                return existing, False
        except CheckpointCorrupt as e:
            log.info("Replacing %s: %s", existing, e)
    _, _, path = pull(remote, name, dest, manifest)
    return path, True


# ---- push -----------------------------------------------------------------------------------------------------------
def _cmd_push(args: argparse.Namespace, ctx: _Context) -> int:
    src = Path(args.dir)
    if not src.is_dir():
        raise CheckpointNotFound(f"{src}: no such folder")
    if (src / MANIFEST_NAME).exists() or parse_checkpoint_name(src.name) is not None:
        folders = [src]
    else:
        folders = [p for p in sorted(src.iterdir()) if p.is_dir() and parse_checkpoint_name(p.name) is not None]
        if not folders:
            raise UsageError(f"{src}: neither a checkpoint folder (checkpoint-step-N, checkpoint-N, ... or one with "
                             f"{MANIFEST_NAME}) nor a folder of checkpoints")
    single = len(folders) == 1 and folders[0] == src
    pushed: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    invalid: list[dict[str, str]] = []
    ready: list[tuple[Path, Manifest, bytes]] = []
    for p in folders:
        if not (p / MANIFEST_NAME).exists() and not single and not (p / TRAINER_STATE).exists():
            skipped.append({"name": p.name, "reason": f"incomplete: no {MANIFEST_NAME} or {TRAINER_STATE}"})
            continue
        try:
            ready.append(_prepare_push(p))
        except CheckpointCorrupt as e:
            invalid.append({"name": p.name, "error": str(e)})
    ready.sort(key=lambda t: recency(_ref(t[1].name, t[1].kind, t[1].global_step)))
    with _remote(ctx, args.url) as remote:
        url = remote.url
        if ready:
            lease = Lease(remote, takeover=args.takeover)
            lease.acquire()
            try:
                latest = remote.read_latest()
                for p, manifest, manifest_bytes in ready:
                    if _remote_holds(remote, manifest):
                        skipped.append({"name": manifest.name, "reason": "already on the remote"})
                        continue
                    new_latest = next_latest(latest, manifest, manifest_bytes)
                    lease.check()
                    with _bar(manifest.total_size, f"push {manifest.name}") as bar:
                        remote.commit_checkpoint(manifest.name, p, manifest, manifest_bytes, new_latest,
                                                 progress=bar.update)
                    latest = new_latest or latest
                    pushed.append({"name": manifest.name, "global_step": manifest.global_step,
                                   "files": len(manifest.files), "size": manifest.total_size,
                                   "latest": new_latest is not None})
            finally:
                lease.release()
    lines = [f"pushed   {x['name']} ({x['files']} files, {_human_size(x['size'])})"
             + (", LATEST" if x["latest"] else "") for x in pushed]
    lines += [f"skipped  {x['name']}: {x['reason']}" for x in skipped]
    lines += [f"INVALID  {x['name']}: {x['error']}" for x in invalid]
    lines.append(f"-> {url}")
    ctx.emit({"url": url, "pushed": pushed, "skipped": skipped, "invalid": invalid}, "\n".join(lines))
    return EXIT_INVALID if invalid else EXIT_OK


def _prepare_push(path: Path) -> tuple[Path, Manifest, bytes]:
    """A folder's manifest and its bytes: ours are verified first; a foreign folder gets a manifest now."""
    if (path / MANIFEST_NAME).exists():
        manifest, _ = local.verify(path)
    else:
        manifest = _adopt_folder(path)
    return path, manifest, (path / MANIFEST_NAME).read_bytes()


def _adopt_folder(path: Path) -> Manifest:
    """Write a manifest into a folder another tool wrote; its epoch comes from trainer_state.json when present."""
    epoch = 0
    extra: dict[str, Any] = {}
    state_file = path / TRAINER_STATE
    if state_file.is_file():
        extra["source"] = "transformers"
        try:
            epoch = max(int(float(json.loads(state_file.read_bytes()).get("epoch") or 0)), 0)
        except (ValueError, TypeError, AttributeError, OverflowError):
            log.warning("%s: unreadable; recording epoch 0", state_file)
    return local.manifest_for_folder(path, epoch=epoch, extra=extra)


def _remote_holds(remote: Remote, manifest: Manifest) -> bool:
    """Whether the remote has this checkpoint with the same bytes (stored as plain files or as blobs)."""
    try:
        return same_content(remote.read_manifest(manifest.name)[0], manifest)
    except (FileNotFoundError, CheckpointCorrupt):
        return False


# ---- prune ----------------------------------------------------------------------------------------------------------
def _cmd_prune(args: argparse.Namespace, ctx: _Context) -> int:
    keep_epochs = _keep_epochs(args.keep_epochs)
    if _is_remote(args.url):
        with _remote(ctx, args.url) as remote:
            url = remote.url
            listing = remote_listing(remote, strict=True)
            cands = {c.name: c for c in listing.candidates}
            refs = [_ref(c.name, c.kind, c.global_step, c.epoch, c.healthy) for c in listing.candidates]
            doomed, invalid = _plan_prune(refs, args.keep_last, keep_epochs,
                                          lambda n: _verify_remote(remote, n, explicit=False).error)
            if (doomed or invalid) and not args.dry_run:
                lease = Lease(remote, takeover=args.takeover)
                lease.acquire()
                try:
                    for name, reason in invalid.items():
                        lease.check()
                        quarantine.quarantine_remote(remote, name, cands[name].manifest_sha256, reason)
                    for name in doomed:
                        lease.check()
                        remote.delete_checkpoint(name)
                        log.info("Deleted %s/%s", url, name)
                    repoint_latest(remote, {*doomed, *invalid}, listing.candidates)
                    remote.collect_unused_blobs()
                finally:
                    lease.release()
    else:
        path = Path(args.url)
        if not path.is_dir():
            raise CheckpointNotFound(f"{path}: no such folder")
        url = str(path)
        checkpoints = local.list_checkpoints(path)
        refs = [_ref(c.name, c.manifest.kind, c.manifest.global_step, c.manifest.epoch, c.manifest.healthy)
                for c in checkpoints]
        doomed, invalid = _plan_prune(refs, args.keep_last, keep_epochs, lambda n: _verify_local(path / n, ctx).error)
        if not args.dry_run:
            for name, reason in invalid.items():
                quarantine.quarantine_local(path, name, reason)
            for name in doomed:
                local.delete(path, name)
    kept = sorted(r.name for r in refs if r.name not in doomed and r.name not in invalid)
    verb = "would delete" if args.dry_run else "deleted"
    lines = [f"INVALID  {n}: {e} ({'would be ' if args.dry_run else ''}quarantined, not deleted)"
             for n, e in invalid.items()]
    lines += [f"{verb} {n}" for n in doomed] or [f"nothing to delete in {url}"]
    lines.append(f"kept {len(kept)}: {', '.join(kept) or '-'}")
    ctx.emit({"url": url, "dry_run": bool(args.dry_run), "deleted": doomed, "kept": kept, "invalid": invalid},
             "\n".join(lines))
    return EXIT_OK


def _plan_prune(
    refs: list[Ref], keep_last: int, keep_epochs: int, check: Callable[[str], str | None]
) -> tuple[list[str], dict[str, str]]:
    """Retention's plan, with every kept checkpoint that outranks a deleted one of its kind verified first: an
    invalid one takes no slot (it is quarantined, not deleted), so a valid older one is never deleted in its
    favour. Returns (names to delete, invalid name -> reason)."""
    invalid: dict[str, str] = {}
    valid: set[str] = set()
    while True:
        live = [r for r in refs if r.name not in invalid]
        doomed = plan_deletions(live, keep_last, keep_epochs)
        gone = [r for r in live if r.name in doomed]
        suspects = [r for r in live if r.name not in doomed and r.name not in valid
                    and any(d.kind == r.kind and recency(d) < recency(r) for d in gone)]
        if not suspects:
            return doomed, invalid
        for r in sorted(suspects, key=recency, reverse=True):
            error = check(r.name)
            if error is None:
                valid.add(r.name)
            else:
                invalid[r.name] = error


# ---- rm -------------------------------------------------------------------------------------------------------------
def _cmd_rm(args: argparse.Namespace, ctx: _Context) -> int:
    run_url, name = _split(args.url)
    if name is None:
        raise UsageError(f"{args.url}: name one checkpoint, e.g. {args.url.rstrip('/')}/checkpoint-step-500")
    if _is_remote(args.url):
        with _remote(ctx, run_url) as remote:
            url = remote.url
            listing = remote_listing(remote, strict=True)
            held = [q.where for q in listing.quarantined if q.name == name]
            visible = name in listing.manifests
            if not (visible or held or name in listing.unreadable):
                raise CheckpointNotFound(f"{url}/{name}: no such checkpoint")
            if visible and not args.force:
                others = [c.name for c in order_candidates(listing.candidates) if c.name != name]
                _refuse_last_valid(f"{url}/{name}", others, lambda n: _verify_remote(remote, n, explicit=False).error)
            lease = Lease(remote, takeover=args.takeover)
            lease.acquire()
            try:
                remote.delete_checkpoint(name)  # manifest first, then its files
                quarantine.unmark_remote(remote, name)
                repoint_latest(remote, name, listing.candidates)
                remote.collect_unused_blobs()
            finally:
                lease.release()
    else:
        path = Path(run_url)
        url = str(path)
        held = [q.where for q in quarantine.list_local(path) if q.name == name]
        visible = (path / name).is_dir()
        if not (visible or held):
            raise CheckpointNotFound(f"{path / name}: no such checkpoint (nor a quarantined copy of it)")
        if visible and not args.force:
            others = [c.name for c in sorted(local.list_checkpoints(path), key=lambda c: recency(
                _ref(c.name, c.manifest.kind, c.manifest.global_step, healthy=c.manifest.healthy)), reverse=True)
                if c.name != name]
            _refuse_last_valid(str(path / name), others, lambda n: _verify_local(path / n, ctx).error)
        if visible:
            local.delete(path, name)
        quarantine.delete_local(path, name)
    deleted = ([f"{url}/{name}"] if visible else []) + held
    ctx.emit({"url": url, "checkpoint": name, "deleted": deleted}, "\n".join(f"deleted {d}" for d in deleted))
    return EXIT_OK


def _refuse_last_valid(where: str, others: list[str], check: Callable[[str], str | None]) -> None:
    """Deleting a valid checkpoint is refused when no other one verifies (newest first, stopping at the first)."""
    name = where.rsplit("/", 1)[-1]
    if check(name) is not None:
        return  # a damaged one: deleting it loses nothing
    if any(check(n) is None for n in others):
        return
    raise UsageError(f"refusing to delete {where}: it is the last valid checkpoint there; pass --force to delete "
                     "it anyway")


# ---- watch ----------------------------------------------------------------------------------------------------------
class _Watcher:
    """Finds complete checkpoints in a folder a trainer writes and queues the new ones on an Uploader."""

    def __init__(self, directory: Path, uploader: Any, settle: float) -> None:
        self.directory = directory
        self.stage = directory / STAGE_DIR
        self.uploader = uploader
        self.settle = settle
        self.known: dict[str, Manifest] = {}  # checkpoint name -> manifest mirrored or queued
        self.ckpt_files: set[tuple[str, int, int]] = set()  # Lightning (file name, size, mtime_ns) mirrored
        self.max_step = 0
        self.warned: set[str] = set()

    def start(self) -> None:
        """Learn what the remote already holds, so nothing is uploaded twice after a restart."""
        if self.stage.is_dir():  # copies left by an earlier run that stopped before queueing them
            local.cleanup_leftovers(self.stage)
            for p in self.stage.iterdir():
                if p.is_dir() and parse_checkpoint_name(p.name) is not None:
                    local.delete(self.stage, p.name)
        manifests = remote_listing(self.uploader.remote).manifests
        for m in manifests.values():
            self.known[m.name] = m
            self.max_step = max(self.max_step, m.global_step)
            key = _ckpt_key(m.extra)
            if key is not None:
                self.ckpt_files.add(key)

    def scan(self) -> list[tuple[Path, Manifest]]:
        """Complete checkpoints not mirrored yet, oldest first: (folder holding it, manifest)."""
        if not self.directory.is_dir():
            return []
        now = time.time()
        found: list[tuple[Path, Manifest]] = []
        ckpts: list[Path] = []
        for p in sorted(self.directory.iterdir()):
            try:
                if p.is_dir() and parse_checkpoint_name(p.name) is not None:
                    item = self._folder(p, now)
                    if item is not None:
                        found.append(item)
                elif p.suffix == ".ckpt" and p.is_file():
                    ckpts.append(p)
            except (CheckpointCorrupt, OSError, ValueError) as e:
                self._warn_once(p.name, f"Not mirroring {p}: {e}")
        for _, m in found:
            self.max_step = max(self.max_step, m.global_step)
        # Files with step=N first, so a file without one (last.ckpt) is numbered after all of them.
        ckpts.sort(key=lambda p: (_STEP_IN_NAME.search(p.name) is None, p.name))
        for p in ckpts:
            try:
                item = self._lightning(p, now)
                if item is not None:
                    found.append(item)
            except (CheckpointCorrupt, OSError, ValueError) as e:
                self._warn_once(p.name, f"Not mirroring {p}: {e}")
        found.sort(key=lambda t: recency(_ref(t[1].name, t[1].kind, t[1].global_step)))
        return found

    def submit(self, folder: Path, manifest: Manifest) -> bool:
        """Queue one checkpoint (the uploader hard-links it into its own staging folder first)."""
        try:
            self.uploader.submit(folder, manifest)
        except OSError as e:  # deleted by the trainer's own retention meanwhile
            self._warn_once(manifest.name, f"Not mirroring {folder / manifest.name}: {e}")
            return False
        finally:
            if folder == self.stage:
                local.delete(self.stage, manifest.name)  # the uploader's staging links keep the bytes
        self.known[manifest.name] = manifest
        key = _ckpt_key(manifest.extra)
        if key is not None:
            self.ckpt_files.add(key)
        return True

    def _folder(self, path: Path, now: float) -> tuple[Path, Manifest] | None:
        if (path / MANIFEST_NAME).exists():
            manifest, _ = local.read_manifest(path)
        elif (path / TRAINER_STATE).exists() and _quiet_for(path, now) >= self.settle:
            manifest = _adopt_folder(path)
            log.info("Wrote %s for %s", MANIFEST_NAME, path)
        else:
            return None  # still being written, or not a checkpoint folder we can judge complete
        known = self.known.get(path.name)
        if known is not None and same_content(known, manifest):
            return None
        return self.directory, manifest

    def _lightning(self, path: Path, now: float) -> tuple[Path, Manifest] | None:
        st = path.stat()
        key = (path.name, st.st_size, st.st_mtime_ns)
        if key in self.ckpt_files or now - st.st_mtime < self.settle:
            return None
        m = _STEP_IN_NAME.search(path.name)
        step = int(m.group(1)) if m else self.max_step + 1
        e = _EPOCH_IN_NAME.search(path.name)
        self.max_step = max(self.max_step, step)
        name = f"checkpoint-step-{step}"
        rel = _ODD_CHARS.sub("_", path.name)
        if rel.startswith((".", "-")):
            rel = "_" + rel[1:]
        manifest = Manifest(name=name, kind="step", global_step=step, epoch=int(e.group(1)) if e else 0,
                            batch_idx=-1, files=[],
                            extra={"source": "lightning", "source_file": path.name, "source_size": st.st_size,
                                   "source_mtime_ns": st.st_mtime_ns})

        def copy(tmp: Path) -> list[local.FileEntry]:
            with open(path, "rb") as f:
                entry = local.write_file(tmp, rel, iter(lambda: f.read(8 << 20), b""),
                                         crc32c=self.uploader.remote.keeps_crc32c)
            after = path.stat()
            if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                raise OSError(f"{path} changed while it was copied; trying again at the next scan")
            return [entry]

        return self.stage, local.commit(self.stage, manifest, copy)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            log.warning("%s", message)


def _ckpt_key(extra: dict[str, Any]) -> tuple[str, int, int] | None:
    if extra.get("source") != "lightning":
        return None
    try:
        return str(extra["source_file"]), int(extra["source_size"]), int(extra["source_mtime_ns"])
    except (KeyError, TypeError, ValueError):
        return None


def _quiet_for(path: Path, now: float) -> float:
    """Seconds since anything in the folder last changed."""
    newest = path.stat().st_mtime
    for p in path.rglob("*"):
        try:
            newest = max(newest, p.stat().st_mtime)
        except FileNotFoundError:
            continue
    return now - newest


def _cmd_watch(args: argparse.Namespace, ctx: _Context) -> int:
    from .uploader import Uploader

    directory = Path(args.dir)
    if args.once and not directory.is_dir():
        raise CheckpointNotFound(f"{directory}: no such folder")
    retention = None
    if args.keep_last is not None:
        keep_last, keep_epochs = args.keep_last, _keep_epochs(args.keep_epochs)
        retention = lambda refs: plan_deletions(refs, keep_last, keep_epochs)  # noqa: E731
    uploader = Uploader(args.url, storage_options=ctx.options or None, on_error="raise" if args.once else "warn",
                        takeover=args.takeover, retention=retention)
    watcher = _Watcher(directory, uploader, args.settle)
    stop, abort = threading.Event(), threading.Event()
    restore = _install_signal_handlers(stop, abort)
    reported: set[str] = set()
    flushed = False
    try:
        watcher.start()
        if not args.once:
            log.info("Watching %s, mirroring to %s every %.0fs", directory, uploader.url, args.interval)
        while True:
            for folder, manifest in watcher.scan():
                if watcher.submit(folder, manifest) and args.once:
                    uploader.wait()  # one at a time, so no step checkpoint is skipped as superseded
                    uploader.raise_if_failed()
                if stop.is_set():
                    break
            if not args.once:
                _report_mirrored(ctx, uploader, reported)
            if args.once or stop.wait(args.interval):
                break
        if not args.once:
            print("syncckpt: stopping; flushing queued uploads (signal again to stop now)", file=sys.stderr)
        while not uploader.wait(timeout=0.5):
            if abort.is_set():
                break
        else:
            flushed = True
        uploader.raise_if_failed()
    finally:
        uploader.close(timeout=None if flushed else 0)
        restore()
    status = uploader.status()
    problems = len(watcher.warned)
    if args.once:
        mirrored = status["mirrored"]
        ctx.emit({"url": uploader.url, "mirrored": mirrored, "skipped": status["skipped"],
                  "pending": status["pending"], "problems": problems},
                 "\n".join([f"mirrored {n} -> {uploader.url}" for n in mirrored]
                           or [f"nothing new to mirror from {directory}"]))
        return EXIT_INVALID if problems else EXIT_OK
    _report_mirrored(ctx, uploader, reported)
    if status["pending"] or status["uploading"]:
        raise RemoteError(f"stopped with uploads not finished: {', '.join(status['pending'])} (they stay local)")
    return EXIT_OK


def _report_mirrored(ctx: _Context, uploader: Any, reported: set[str]) -> None:
    for name in uploader.status()["mirrored"]:
        if name not in reported:
            reported.add(name)
            ctx.emit({"event": "mirrored", "checkpoint": name, "url": uploader.url},
                     f"mirrored {name} -> {uploader.url}")


def _install_signal_handlers(stop: threading.Event, abort: threading.Event) -> Callable[[], None]:
    """SIGINT/SIGTERM: the first stops after flushing, the second stops at once. Returns the undo."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            abort.set()
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for s, h in previous.items():
            signal.signal(s, h)

    return restore


# ---- argument parsing -----------------------------------------------------------------------------------------------
def _at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_global_options(p: argparse.ArgumentParser, sub: bool) -> None:
    # On subcommands the flags default to "absent", so `syncckpt --json ls x` and `syncckpt ls x --json` agree.
    absent = argparse.SUPPRESS
    p.add_argument("--json", action="store_true", default=absent if sub else False,
                   help="machine-readable JSON output on stdout")
    p.add_argument("--verbose", "-v", action="store_true", default=absent if sub else False,
                   help="log what happens on stderr")
    p.add_argument("--storage-option", metavar="KEY=VALUE", action="append", default=[],
                   dest="storage_option_sub" if sub else "storage_option",
                   help="option for the store (repeatable; VALUE is JSON-decoded where valid); never printed")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="syncckpt",
        description="Exactly-resumable, pickle-free, SHA-256-manifested training checkpoints, mirrored to "
                    "S3/GCS/any fsspec URL/the HF Hub.",
        epilog="Exit codes: 0 ok, 1 verification failed or something invalid, 2 usage or access error.",
    )
    _add_global_options(parser, sub=False)
    parser.set_defaults(command=None, storage_option_sub=[])
    subs = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")

    def sub(name: str, func: Callable[[argparse.Namespace, _Context], int], help: str) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=help, description=help)
        _add_global_options(p, sub=True)
        p.set_defaults(func=func)
        return p

    p = sub("ls", _cmd_ls, "list checkpoints of a local folder or a remote run, newest first")
    p.add_argument("url", metavar="URL", help="local checkpoint folder or remote run URL")
    p.add_argument("--remote", metavar="URL", help="for a local folder: show whether this remote holds each one")

    p = sub("verify", _cmd_verify, "fully verify one checkpoint or every checkpoint of a run (exit 1 if invalid)")
    p.add_argument("url", metavar="URL[/CHECKPOINT]", help="checkpoint folder/URL, or a folder/run of them")

    p = sub("pull", _cmd_pull, "download a verified checkpoint into DEST/NAME")
    p.add_argument("url", metavar="URL", help="remote run URL (or a checkpoint URL)")
    p.add_argument("dest", metavar="DEST", help="local checkpoint folder to pull into")
    p.add_argument("--checkpoint", metavar="NAME|latest", help="which checkpoint (default: newest valid)")

    p = sub("push", _cmd_push, "mirror a checkpoint folder (or a folder of them) to a remote run")
    p.add_argument("dir", metavar="DIR", help="checkpoint folder, transformers checkpoint-N folder, or their parent")
    p.add_argument("url", metavar="URL", help="remote run URL")
    p.add_argument("--takeover", action="store_true", help="take over the run from another live session")

    p = sub("prune", _cmd_prune, "delete old checkpoints of a local folder or a remote run by retention rules")
    p.add_argument("url", metavar="URL", help="local checkpoint folder or remote run URL")
    p.add_argument("--keep-last", type=_at_least(1), required=True, metavar="N", help="step checkpoints to keep")
    p.add_argument("--keep-epochs", type=_at_least(0), metavar="M",
                   help="epoch checkpoints to keep (default: all)")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("--takeover", action="store_true", help="take over the run from another live session")

    p = sub("rm", _cmd_rm, "delete one checkpoint (and its quarantined copies) from a local folder or a remote run")
    p.add_argument("url", metavar="URL/CHECKPOINT", help="e.g. checkpoints/checkpoint-step-500 or s3://b/run/best_model")
    p.add_argument("--force", action="store_true", help="delete it even when it is the last valid checkpoint")
    p.add_argument("--takeover", action="store_true", help="take over the run from another live session")

    p = sub("watch", _cmd_watch, "mirror the complete checkpoints a trainer writes into DIR (a sidecar)")
    p.add_argument("dir", metavar="DIR", help="folder the trainer writes checkpoints into")
    p.add_argument("url", metavar="URL", help="remote run URL")
    p.add_argument("--interval", type=_seconds, default=30.0, metavar="S", help="seconds between scans (30)")
    p.add_argument("--settle", type=_seconds, default=30.0, metavar="S",
                   help="seconds a transformers folder or .ckpt file must stay unchanged to count as complete (30)")
    p.add_argument("--keep-last", type=_at_least(1), metavar="N", help="remote step checkpoints to keep")
    p.add_argument("--keep-epochs", type=_at_least(0), metavar="M",
                   help="remote epoch checkpoints to keep with --keep-last (default: all)")
    p.add_argument("--once", action="store_true", help="scan once, upload, wait, exit")
    p.add_argument("--takeover", action="store_true", help="take over the run from another live session")
    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
