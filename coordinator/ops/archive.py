"""``fedq archive``: one archive pass by hand (the coordinator runs them by itself every few seconds).

For operators (move a stopped job's history out of Redis now) and for the
fault tests, which kill this process at each step of moving a record.
"""

from __future__ import annotations

import argparse

from fedq.common.cli import UserError
from fedq.common.settings import CONNECTION_OPTIONS, Option, add_options, non_negative_int, resolve
from fedq.common.store import ModelStore
from fedq.common.store.archive import Archive, ArchiveError

HELP = "Move a job's older history from Redis to its archive now (one pass of the coordinator's archiver)."

OPTIONS = CONNECTION_OPTIONS + [
    Option("archive", str, None, "directory or fsspec URL (default: the archive the job's coordinator recorded)"),
    Option(
        "hot_versions", non_negative_int, None, "versions kept whole in Redis (default: as the coordinator recorded)"
    ),
    Option(
        "checkpoint_every",
        non_negative_int,
        None,
        "archive the weights of every k-th version (default: as the coordinator recorded)",
    ),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, OPTIONS)


def main(args: argparse.Namespace) -> int:
    from fedq.coordinator.service.archiver import Archiver

    values = resolve(args, OPTIONS)
    store = ModelStore.open(values["redis_url"], values["job"])
    if store.versions.last_committed() is None:
        raise UserError(f"job {values['job']!r} has no versions in Redis (wrong --job or --redis-url?)")
    recorded = store.status.archive_settings()
    url = values["archive"] or recorded.get("url")
    if url is None:
        raise UserError(
            f"job {values['job']!r} has no archive (its coordinator runs with --archive none); name one with --archive"
        )
    hot_versions = values["hot_versions"] or recorded.get("hot_versions") or 22
    checkpoint_every = values["checkpoint_every"]
    if checkpoint_every is None:
        checkpoint_every = recorded.get("checkpoint_every", 50)
    try:
        done = Archiver(store, Archive(url).job(store.job), hot_versions, checkpoint_every).run_once()
    except ArchiveError as error:
        raise UserError(str(error)) from None
    if done.skipped:
        print(f"nothing done: {done.skipped}")
        return 1
    print(
        f"job {store.job!r}: {len(done.archived)} segment(s) written, archive holds versions "
        f"0..{done.archived_through}; {done.trimmed} version(s) left Redis"
    )
    return 0
