"""The ``syncckpt`` command: list, verify, pull, push, prune and mirror checkpoints from a shell.

A URL argument is either a plain path (a local folder) or a remote run URL: ``s3://bucket/runs/a``,
``gs://bucket/runs/a``, ``hf://user/repo``, ``file:///mnt/share/run``, any fsspec URL. Where one checkpoint is
meant, the URL may end in its name (``s3://bucket/runs/a/checkpoint-step-500``). Each command has one code path
over a :class:`syncckpt.store.Store`: a ``file://`` URL opens a remote run (the folder is treated as a mirror), a
plain path a local folder. This module parses arguments and reports errors; the commands live in
``syncckpt._cli_commands`` and the watch engine in :mod:`syncckpt.watch`.

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
                                 Credentials are never printed: a value under a credential-named key (key,
                                 secret, token, password, ...), URL userinfo and query values, and the
                                 credential variables client libraries read (HF_TOKEN, AWS_SECRET_ACCESS_KEY)
                                 are replaced by *** in every message (syncckpt._secrets has the rule).
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
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._cli_commands import cmd_ls, cmd_prune, cmd_pull, cmd_push, cmd_rm, cmd_verify
from ._cli_common import EXIT_INVALID, EXIT_OK, EXIT_USAGE, Context, UsageError, keep_epochs, parse_storage_options
from ._secrets import Scrubber
from .errors import CheckpointCorrupt, CheckpointNotFound, SyncCkptError
from .retention import plan_deletions
from .watch import watch

__all__ = ["EXIT_INVALID", "EXIT_OK", "EXIT_USAGE", "UsageError", "main"]

log = logging.getLogger("syncckpt")


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
        options = parse_storage_options(list(args.storage_option or []) + list(args.storage_option_sub or []))
    except UsageError as e:
        _report_error(str(e), EXIT_USAGE, as_json, Scrubber(urls=args_list))
        return EXIT_USAGE
    scrub = Scrubber(options, urls=args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    ctx = Context(options=options, as_json=as_json, verbose=bool(args.verbose), scrub=scrub)
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
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, not argparse's usage dump
        print(f"syncckpt: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise _Exit(EXIT_USAGE)


def _fail(e: BaseException, code: int, ctx: Context) -> int:
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
def _logging_to_stderr(ctx: Context) -> Iterator[None]:
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


# ---- watch: the engine lives in syncckpt.watch -----------------------------------------------------------------------
def _cmd_watch(args: argparse.Namespace, ctx: Context) -> int:
    retention = None
    if args.keep_last is not None:
        retention = functools.partial(
            plan_deletions, keep_last=args.keep_last, keep_epochs=keep_epochs(args.keep_epochs)
        )

    def mirrored(name: str, url: str) -> None:
        ctx.emit({"event": "mirrored", "checkpoint": name, "url": url}, f"mirrored {name} -> {url}")

    report = watch(
        args.dir,
        args.url,
        storage_options=ctx.options,
        interval=args.interval,
        settle=args.settle,
        retention=retention,
        once=args.once,
        takeover=args.takeover,
        on_mirrored=mirrored,
    )
    if not args.once:
        return EXIT_OK
    ctx.emit(
        {
            "url": report.url,
            "mirrored": report.mirrored,
            "skipped": report.skipped,
            "pending": report.pending,
            "problems": report.problems,
        },
        "\n".join(
            [f"mirrored {n} -> {report.url}" for n in report.mirrored]
            or [f"nothing new to mirror from {Path(args.dir)}"]
        ),
    )
    return EXIT_INVALID if report.problems else EXIT_OK


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
    p.add_argument(
        "--json", action="store_true", default=absent if sub else False, help="machine-readable JSON output on stdout"
    )
    p.add_argument(
        "--verbose", "-v", action="store_true", default=absent if sub else False, help="log what happens on stderr"
    )
    p.add_argument(
        "--storage-option",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="storage_option_sub" if sub else "storage_option",
        help="option for the store (repeatable; VALUE is JSON-decoded where valid); never printed",
    )


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

    def sub(name: str, func: Callable[[argparse.Namespace, Context], int], help: str) -> argparse.ArgumentParser:
        p = subs.add_parser(name, help=help, description=help)
        _add_global_options(p, sub=True)
        p.set_defaults(func=func)
        return p

    p = sub("ls", cmd_ls, "list checkpoints of a local folder or a remote run, newest first")
    p.add_argument("url", metavar="URL", help="local checkpoint folder or remote run URL")
    p.add_argument("--remote", metavar="URL", help="for a local folder: show whether this remote holds each one")

    p = sub("verify", cmd_verify, "fully verify one checkpoint or every checkpoint of a run (exit 1 if invalid)")
    p.add_argument("url", metavar="URL[/CHECKPOINT]", help="checkpoint folder/URL, or a folder/run of them")

    p = sub("pull", cmd_pull, "download a verified checkpoint into DEST/NAME")
    p.add_argument("url", metavar="URL", help="remote run URL (or a checkpoint URL)")
    p.add_argument("dest", metavar="DEST", help="local checkpoint folder to pull into")
    p.add_argument("--checkpoint", metavar="NAME|latest", help="which checkpoint (default: newest valid)")

    p = sub("push", cmd_push, "mirror a checkpoint folder (or a folder of them) to a remote run")
    p.add_argument("dir", metavar="DIR", help="checkpoint folder, transformers checkpoint-N folder, or their parent")
    p.add_argument("url", metavar="URL", help="remote run URL")
    p.add_argument("--takeover", action="store_true", help="take over the run from another live session")

    p = sub("prune", cmd_prune, "delete old checkpoints of a local folder or a remote run by retention rules")
    p.add_argument("url", metavar="URL", help="local checkpoint folder or remote run URL")
    p.add_argument("--keep-last", type=_at_least(1), required=True, metavar="N", help="step checkpoints to keep")
    p.add_argument("--keep-epochs", type=_at_least(0), metavar="M", help="epoch checkpoints to keep (default: all)")
    p.add_argument("--dry-run", action="store_true", help="only print what would be deleted")
    p.add_argument("--takeover", action="store_true", help="take over the run from another live session")

    p = sub("rm", cmd_rm, "delete one checkpoint (and its quarantined copies) from a local folder or a remote run")
    p.add_argument(
        "url", metavar="URL/CHECKPOINT", help="e.g. checkpoints/checkpoint-step-500 or s3://b/run/best_model"
    )
    p.add_argument("--force", action="store_true", help="delete it even when it is the last valid checkpoint")
    p.add_argument("--takeover", action="store_true", help="take over the run from another live session")

    p = sub("watch", _cmd_watch, "mirror the complete checkpoints a trainer writes into DIR (a sidecar)")
    p.add_argument("dir", metavar="DIR", help="folder the trainer writes checkpoints into")
    p.add_argument("url", metavar="URL", help="remote run URL")
    p.add_argument("--interval", type=_seconds, default=30.0, metavar="S", help="seconds between scans (30)")
    p.add_argument(
        "--settle",
        type=_seconds,
        default=30.0,
        metavar="S",
        help="seconds a transformers folder or .ckpt file must stay unchanged to count as complete (30)",
    )
    p.add_argument("--keep-last", type=_at_least(1), metavar="N", help="remote step checkpoints to keep")
    p.add_argument(
        "--keep-epochs",
        type=_at_least(0),
        metavar="M",
        help="remote epoch checkpoints to keep with --keep-last (default: all)",
    )
    p.add_argument("--once", action="store_true", help="scan once, upload, wait, exit")
    p.add_argument("--takeover", action="store_true", help="take over the run from another live session")
    return parser


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
