"""The ``syncckpt`` subcommands ls, verify, pull, push, prune and rm: each one code path over a store.

A command opens its URL as a :class:`~syncckpt.store.Store` (a local folder or a remote run), works through the
store's operations, and prints one result through :meth:`Context.emit <syncckpt._cli_common.Context.emit>`.
What each command does, its output and its exit codes are documented in :mod:`syncckpt.cli`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import local, quarantine
from ._cli_common import (
    EXIT_INVALID,
    EXIT_OK,
    Context,
    UsageError,
    check_name,
    fitting_table,
    human_size,
    iso,
    keep_epochs,
)
from .errors import CheckpointCorrupt, CheckpointNotFound
from .manifest import MANIFEST_NAME, Manifest, parse_checkpoint_name, same_content
from .pull import pull_or_reuse, remote_listing
from .resume import find_resumable
from .retention import Ref, next_latest, plan_deletions, recency
from .select import order_candidates
from .store import Store, folder_error, is_remote_url, open_mirror, open_store, split_url
from .watch import TRAINER_STATE, adopt_folder

log = logging.getLogger("syncckpt")


# ---- ls -------------------------------------------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace, ctx: Context) -> int:
    """``syncckpt ls URL [--remote URL]``: the table of checkpoints, newest first, then the quarantined ones."""
    if args.remote and is_remote_url(args.url):
        raise UsageError("--remote compares a local folder with a remote run; URL is remote already")
    run, only = split_url(args.url, "no")
    with open_store(run, ctx.open, itself=True) as store:
        if not store.exists():
            raise CheckpointNotFound(f"{store.url}: no such folder")
        listing = store.listing()
        mirror = listing.checkpoints if store.is_remote else _remote_manifests(ctx, args.remote)
    rows = [
        _row(m, None if mirror is None else _same(mirror.get(name), m))
        for name, m in listing.checkpoints.items()
        if only in (None, name)
    ]
    held = [q for q in listing.quarantined if only in (None, q.name)]
    if only is not None and not rows and not held:
        raise CheckpointNotFound(f"{store.where(only)}: no such checkpoint")
    rows.sort(key=lambda r: recency(Ref(r["name"], r["kind"], r["global_step"], 0)), reverse=True)
    text = _ls_table(rows) if rows else f"no checkpoints in {store.url}"
    if held:
        text += "\n" + "\n".join(_quarantine_line(q) for q in held)
    ctx.emit({"url": store.url, "checkpoints": rows, "quarantined": [dataclasses.asdict(q) for q in held]}, text)
    return EXIT_OK


def _ls_table(rows: list[dict[str, Any]]) -> str:
    """The listing, as wide as the terminal allows (a notebook cell, or no terminal: 80 columns): the creation
    time shortens from ISO 8601 to minutes to the date before the columns close up."""
    yes_no = {True: "yes", False: "no", None: "-"}
    headers = ["checkpoint", "kind", "step", "epoch", "size", "created", "healthy", "mirrored"]

    def cells(created: Callable[[str], str]) -> list[list[str]]:
        return [
            [r["name"], r["kind"], str(r["global_step"]), str(r["epoch"]), human_size(r["size"])]
            + [created(r["created_iso"]), yes_no[r["healthy"]], yes_no[r["mirrored"]]]
            for r in rows
        ]

    variants = [cells(lambda t: t), cells(lambda t: t[:16].replace("T", " ")), cells(lambda t: t[:10])]
    return fitting_table(headers, variants, shutil.get_terminal_size((80, 24)).columns)


def _remote_manifests(ctx: Context, url: str | None) -> dict[str, Manifest] | None:
    """The checkpoints of the run ``--remote`` names, to compare a local folder with; None without it."""
    if not url:
        return None
    with open_mirror(url, ctx.open) as remote:
        return remote.listing().checkpoints


def _same(theirs: Manifest | None, mine: Manifest) -> bool:
    return theirs is not None and same_content(theirs, mine)


def _quarantine_line(q: quarantine.Quarantined) -> str:
    kept = f" (kept as {q.where})" if q.location == "local" else ""
    return f"QUARANTINED  {q.name}: {q.reason}{kept}"


def _row(m: Manifest, mirrored: bool | None) -> dict[str, Any]:
    return {
        "name": m.name,
        "kind": m.kind,
        "global_step": m.global_step,
        "epoch": m.epoch,
        "batch_idx": m.batch_idx,
        "size": m.total_size,
        "files": len(m.files),
        "created": m.created,
        "created_iso": iso(m.created),
        "healthy": m.healthy,
        "mirrored": mirrored,
    }


# ---- verify ---------------------------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace, ctx: Context) -> int:
    """``syncckpt verify URL[/CHECKPOINT]``: ok or INVALID per checkpoint; exit 1 when any is invalid."""
    run, name = split_url(args.url, "name-or-manifest")
    held: list[quarantine.Quarantined] = []
    with open_store(run, ctx.open) as store:
        url = store.url if name is None else store.where(name)
        if name is None:  # quarantined ones were verified before: reported, not downloaded again
            if not store.exists():
                raise folder_error(Path(store.url))
            listing = store.listing()
            held = listing.quarantined
            names = sorted([*listing.checkpoints, *listing.damaged])
        else:
            names = [name]
        if not names and not held:
            raise CheckpointNotFound(f"{store.url}: no checkpoints there")
        results = [store.verify(n, explicit=name is not None) for n in names]
    lines = [
        f"ok       {r.name} ({r.files} files, {human_size(r.size)})"
        if r.error is None
        else f"INVALID  {r.name}: {r.error}"
        for r in results
    ]
    lines += [_quarantine_line(q) for q in held]
    bad = [r for r in results if r.error is not None]
    total, invalid = len(results) + len(held), len(bad) + len(held)
    summary = f"{invalid} of {total} checkpoints INVALID" if invalid else f"all {total} valid"
    lines.append(summary + (f" ({len(held)} quarantined earlier)" if held else ""))
    ctx.emit(
        {
            "url": url,
            "valid": not invalid,
            "checkpoints": [
                {"name": r.name, "valid": r.error is None, "error": r.error, "files": r.files, "size": r.size}
                for r in results
            ],
            "quarantined": [dataclasses.asdict(q) for q in held],
        },
        "\n".join(lines),
    )
    return EXIT_INVALID if invalid else EXIT_OK


# ---- pull -----------------------------------------------------------------------------------------------------------
def cmd_pull(args: argparse.Namespace, ctx: Context) -> int:
    """``syncckpt pull URL DEST [--checkpoint NAME|latest]``: the named or the newest valid checkpoint, verified."""
    run, name = split_url(args.url)
    if args.checkpoint and name is not None and args.checkpoint != name:
        raise UsageError(
            f"{args.url} names checkpoint {name} and --checkpoint says {args.checkpoint}: give the run URL "
            f"({run}) with --checkpoint, or the checkpoint URL alone"
        )
    if args.checkpoint and args.checkpoint != "latest":
        name = check_name(args.checkpoint, "--checkpoint")
    elif args.checkpoint == "latest":
        name = None
    dest = Path(args.dest)
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"{dest}: exists and is not a folder")
    with open_mirror(run, ctx.open) as store:
        if name is not None:
            manifest = store.read_manifest(name)
            _, _, path, fetched = pull_or_reuse(store.remote, name, dest, manifest)
        else:
            # unreachable raises, never reads as empty; a plain path may be a training folder, which has no LATEST
            listing = remote_listing(store.remote, strict=True, latest_expected=is_remote_url(run))
            if not listing.candidates:
                raise CheckpointNotFound(f"{store.url}: no checkpoints there")
            # the one search resume makes: newest valid first, a damaged one skipped for the next
            search = find_resumable(dest, store.remote, listing=listing, include_local=False, quarantine_damaged=False)
            if search.found is None:
                raise CheckpointCorrupt(f"{store.url}: no valid checkpoint there; {search.damage_report()}")
            name, manifest = search.found.candidate.name, listing.manifests[search.found.candidate.name]
            path, fetched = search.found.path, search.found.downloaded
    verb = "pulled" if fetched else "already present (verified)"
    ctx.emit(
        {
            "url": store.url,
            "checkpoint": name,
            "path": str(path),
            "global_step": manifest.global_step,
            "files": len(manifest.files),
            "size": manifest.total_size,
            "downloaded": fetched,
        },
        f"{verb}: {name} (step {manifest.global_step}, {len(manifest.files)} files, "
        f"{human_size(manifest.total_size)}) -> {path}",
    )
    return EXIT_OK


# ---- push -----------------------------------------------------------------------------------------------------------
def cmd_push(args: argparse.Namespace, ctx: Context) -> int:
    """``syncckpt push DIR URL``: mirror a checkpoint folder (or a folder of them), oldest first."""
    ready, skipped, invalid = _push_candidates(Path(args.dir))
    pushed: list[dict[str, Any]] = []
    with open_mirror(args.url, ctx.open) as store:
        if ready:
            with store.writing(takeover=args.takeover):
                latest = store.remote.read_latest()
                for p, manifest, manifest_bytes in ready:
                    if store.holds(manifest):
                        skipped.append({"name": manifest.name, "reason": "already on the remote"})
                        continue
                    new_latest = next_latest(latest, manifest, manifest_bytes)  # never moves LATEST backwards
                    store.commit(p, manifest, manifest_bytes, new_latest)
                    latest = new_latest or latest
                    pushed.append(
                        {
                            "name": manifest.name,
                            "global_step": manifest.global_step,
                            "files": len(manifest.files),
                            "size": manifest.total_size,
                            "latest": new_latest is not None,
                        }
                    )
    lines = [
        f"pushed   {x['name']} ({x['files']} files, {human_size(x['size'])})" + (", LATEST" if x["latest"] else "")
        for x in pushed
    ]
    lines += [f"skipped  {x['name']}: {x['reason']}" for x in skipped]
    lines += [f"INVALID  {x['name']}: {x['error']}" for x in invalid]
    lines.append(f"-> {store.url}")
    ctx.emit({"url": store.url, "pushed": pushed, "skipped": skipped, "invalid": invalid}, "\n".join(lines))
    return EXIT_INVALID if invalid else EXIT_OK


def _push_candidates(
    src: Path,
) -> tuple[list[tuple[Path, Manifest, bytes]], list[dict[str, str]], list[dict[str, str]]]:
    """The checkpoint folders under ``src`` ready to push (oldest first), the incomplete ones, the invalid ones."""
    if not src.is_dir():
        raise CheckpointNotFound(f"{src}: no such folder")
    if (src / MANIFEST_NAME).exists() or parse_checkpoint_name(src.name) is not None:
        folders = [src]
    else:
        folders = [p for p in sorted(src.iterdir()) if p.is_dir() and parse_checkpoint_name(p.name) is not None]
        if not folders:
            raise UsageError(
                f"{src}: neither a checkpoint folder (checkpoint-step-N, checkpoint-N, ... or one with "
                f"{MANIFEST_NAME}) nor a folder of checkpoints"
            )
    single = len(folders) == 1 and folders[0] == src
    ready: list[tuple[Path, Manifest, bytes]] = []
    skipped: list[dict[str, str]] = []
    invalid: list[dict[str, str]] = []
    for p in folders:
        if not (p / MANIFEST_NAME).exists() and not single and not (p / TRAINER_STATE).exists():
            skipped.append({"name": p.name, "reason": f"incomplete: no {MANIFEST_NAME} or {TRAINER_STATE}"})
            continue
        try:
            ready.append(_prepare_push(p))
        except CheckpointCorrupt as e:
            invalid.append({"name": p.name, "error": str(e)})
    ready.sort(key=lambda t: recency(Ref(t[1].name, t[1].kind, t[1].global_step, 0)))
    return ready, skipped, invalid


def _prepare_push(path: Path) -> tuple[Path, Manifest, bytes]:
    """A folder's manifest and its bytes: ours are verified first; a foreign folder gets a manifest now."""
    if (path / MANIFEST_NAME).exists():
        manifest, _ = local.verify(path)
    else:
        manifest = adopt_folder(path)
    return path, manifest, (path / MANIFEST_NAME).read_bytes()


# ---- prune ----------------------------------------------------------------------------------------------------------
def cmd_prune(args: argparse.Namespace, ctx: Context) -> int:
    """``syncckpt prune URL --keep-last N [--keep-epochs M] [--dry-run]``: retention, never keeping an invalid
    checkpoint in place of a valid one."""
    with open_store(args.url, ctx.open) as store:
        if not store.exists():
            raise CheckpointNotFound(f"{store.url}: no such folder")
        listing = store.listing()
        refs = [Ref(c.name, c.kind, c.global_step, c.epoch, c.healthy) for c in listing.candidates]
        doomed, invalid = _plan_prune(
            refs, args.keep_last, keep_epochs(args.keep_epochs), lambda n: store.verify(n).error
        )
        if (doomed or invalid) and not args.dry_run:
            digests = {c.name: c.manifest_sha256 for c in listing.candidates}
            with store.writing(takeover=args.takeover):
                for name, reason in invalid.items():
                    store.quarantine(name, digests[name], reason)
                for name in doomed:
                    store.delete(name)
                    log.info("Deleted %s", store.where(name))
                store.after_removal({*doomed, *invalid}, listing)
    kept = sorted(r.name for r in refs if r.name not in doomed and r.name not in invalid)
    verb = "would delete" if args.dry_run else "deleted"
    lines = [
        f"INVALID  {n}: {e} ({'would be ' if args.dry_run else ''}quarantined, not deleted)" for n, e in invalid.items()
    ]
    lines += [f"{verb} {n}" for n in doomed] or [f"nothing to delete in {store.url}"]
    lines.append(f"kept {len(kept)}: {', '.join(kept) or '-'}")
    ctx.emit(
        {"url": store.url, "dry_run": bool(args.dry_run), "deleted": doomed, "kept": kept, "invalid": invalid},
        "\n".join(lines),
    )
    return EXIT_OK


def _plan_prune(
    refs: list[Ref], keep_last: int, keep_epochs: int, check: Callable[[str], str | None]
) -> tuple[list[str], dict[str, str]]:
    """Retention's plan, with every kept checkpoint that is newer than a deleted one (of any kind: a resume takes
    the newest valid checkpoint whatever its kind) verified first: an invalid one takes no slot (it is
    quarantined, not deleted), so a valid older one is never deleted in its favour; the newest healthy checkpoint
    retention always keeps is then a valid one. Returns (names to delete, invalid name -> reason)."""
    invalid: dict[str, str] = {}
    valid: set[str] = set()
    while True:
        live = [r for r in refs if r.name not in invalid]
        doomed = plan_deletions(live, keep_last, keep_epochs)
        gone = [r for r in live if r.name in doomed]
        suspects = [
            r
            for r in live
            if r.name not in doomed and r.name not in valid and any(recency(d) < recency(r) for d in gone)
        ]
        if not suspects:
            return doomed, invalid
        for r in sorted(suspects, key=recency, reverse=True):
            error = check(r.name)
            if error is None:
                valid.add(r.name)
            else:
                invalid[r.name] = error


# ---- rm -------------------------------------------------------------------------------------------------------------
def _looks_like_a_checkpoint_name(last: str) -> bool:
    """Whether the last part of a URL was meant as a checkpoint's name rather than as the run's folder. Pure.

    >>> [_looks_like_a_checkpoint_name(n) for n in ("bestmodel", "best_modle", "checkpoint-step5", "nli-run-1")]
    [True, True, True, False]
    """
    lowered = last.lower()
    return lowered.startswith("checkpoint") or bool(difflib.get_close_matches(lowered, ["best_model"], cutoff=0.75))


def cmd_rm(args: argparse.Namespace, ctx: Context) -> int:
    """``syncckpt rm URL/CHECKPOINT [--force]``: delete one checkpoint and its quarantined copies."""
    run, name = split_url(args.url)
    if name is None:
        parent, _, last = args.url.rstrip("/").rpartition("/")
        if _looks_like_a_checkpoint_name(last):  # a typo of one (bestmodel, checkpoint-step5): say so
            raise UsageError(
                f"{args.url}: {last!r} is not a checkpoint name (checkpoint-step-N, checkpoint-epoch-N, "
                f"checkpoint-N or best_model); `syncckpt ls {parent}` lists them"
            )
        raise UsageError(f"{args.url}: name one checkpoint, e.g. {args.url.rstrip('/')}/checkpoint-step-500")
    with open_store(run, ctx.open) as store:
        listing = store.listing()
        held = [q.where for q in listing.quarantined if q.name == name]
        present = name in listing.checkpoints or name in listing.damaged
        if not (present or held):
            raise store.missing(name)
        if name in listing.checkpoints and not args.force:
            _refuse_last_valid(store, name, [c.name for c in order_candidates(listing.candidates) if c.name != name])
        with store.writing(takeover=args.takeover):
            store.delete(name)  # manifest first, then its files
            store.forget_quarantined(name)
            store.after_removal({name}, listing)
    deleted = ([f"{store.url}/{name}"] if present else []) + held
    ctx.emit({"url": store.url, "checkpoint": name, "deleted": deleted}, "\n".join(f"deleted {d}" for d in deleted))
    return EXIT_OK


def _refuse_last_valid(store: Store, name: str, others: list[str]) -> None:
    """Deleting a valid checkpoint is refused when no other one verifies (newest first, stopping at the first)."""
    if store.verify(name).error is not None:
        return  # a damaged one: deleting it loses nothing
    if any(store.verify(n).error is None for n in others):
        return
    raise UsageError(
        f"refusing to delete {store.where(name)}: it is the last valid checkpoint there; pass --force "
        "to delete it anyway"
    )
