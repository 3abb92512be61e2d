"""The history as a record: ``fedq history``, ``show``, ``export``, ``replay``, ``rollback``.

Each reads both tiers, Redis and the archive, through :class:`TieredHistory`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime

from fedq.common import privacy
from fedq.common.cli import UserError, human_size
from fedq.common.records import VersionRecord
from fedq.common.settings import CONNECTION_OPTIONS, Option, add_options, resolve
from fedq.common.store import ModelStore, StoreError, UnknownVersionError
from fedq.common.store.archive import ArchiveError
from fedq.common.store.tiers import TieredHistory, open_job_archive

HISTORY_OPTIONS = CONNECTION_OPTIONS + [
    Option(
        "archive",
        str,
        None,
        "the job's archive, a directory or fsspec URL (default: the one its coordinator recorded in Redis)",
    ),
]


def open_history(args: argparse.Namespace) -> TieredHistory:
    values = resolve(args, HISTORY_OPTIONS)
    store = ModelStore.open(values["redis_url"], values["job"])
    # Not head(): these commands must work on a job whose head was tampered with, to repair it.
    if store.versions.last_committed() is None:
        raise UserError(f"job {values['job']!r} has no versions in Redis (wrong --job or --redis-url?)")
    try:
        return TieredHistory(store, open_job_archive(store, values["archive"]))
    except ArchiveError as error:
        raise UserError(str(error)) from None


def _version_argument(text: str) -> int | str:
    if text.lower() in ("head", "latest"):
        return "head"
    try:
        version = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version: give a number, or head (latest)") from None
    if version < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version: versions count from 0")
    return version


def add_version_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "version",
        type=_version_argument,
        metavar="VERSION",
        help=f"the version {what}: a number (fedq history lists them), or head (latest) for the newest committed",
    )


def chosen_version(history: TieredHistory, version: int | str) -> int:
    """``version`` as a number: head/latest is the newest committed version (even a tampered head's)."""
    if version != "head":
        return int(version)
    head = history.last_committed()
    if head is None:
        raise UserError(f"job {history.store.job!r} has no versions")
    return head


def _meta(history: TieredHistory, version: int) -> VersionRecord:
    try:
        return history.meta(version)
    except (UnknownVersionError, ArchiveError) as error:
        raise UserError(str(error)) from None


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _score(metrics: dict[str, float]) -> str:
    return " ".join(f"{name}={value:.4f}" for name, value in metrics.items()) or "-"


class History:
    HELP = "A table of a job's versions: time, updates, mean/max staleness, metrics; and its Redis memory."

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_options(parser, HISTORY_OPTIONS)
        parser.add_argument("--json", action="store_true", help="print JSON lines, one per version")
        parser.add_argument("--last", type=int, default=None, help="only the last N versions")

    @staticmethod
    def main(args: argparse.Namespace) -> int:
        history = open_history(args)
        store = history.store
        head = history.last_committed()
        start = 0 if args.last is None else max(0, head - args.last + 1)
        entries = list(history.records(start))
        if args.json:
            for entry in entries:
                print(json.dumps({key: value for key, value in entry.to_dict().items() if key != "config"}))
            return 0
        # A job with differential privacy shows the epsilon spent once each version existed.
        private = any(entry.epsilon is not None for entry in entries)
        epsilon_header = f"  {'epsilon':>7}" if private else ""
        print(
            f"{'version':>7}  {'time (UTC)':19}  {'updates':>7}  {'staleness':>9}  {'max':>4}{epsilon_header}  metrics"
        )
        for entry in entries:
            note = f"  (rollback to {entry.rollback_of})" if entry.rollback_of is not None else ""
            spent = f"  {'-' if entry.epsilon is None else f'{entry.epsilon:.3g}':>7}" if private else ""
            print(
                f"{entry.version:>7}  {_when(entry.created)}  {entry.updates_applied:>7}  "
                f"{entry.mean_staleness:>9.2f}  {entry.max_staleness:>4}{spent}  {_score(entry.metrics)}{note}"
            )
        usage = store.memory_usage()
        parts = ", ".join(
            f"{kind} {human_size(size)}" for kind, size in sorted(usage.items(), key=lambda item: -item[1])
        )
        print(f"Redis memory of job {store.job!r}: {human_size(sum(usage.values()))} ({parts})")
        if history.archive is not None:
            print(
                f"archive {history.archive.url}: {human_size(history.archive.size())}, versions 0.."
                f"{history.archive.last_archived()}; Redis holds versions {history.oldest_in_redis()}..{head}"
            )
        return 0


class Show:
    HELP = "One version's metadata and the updates it applied."

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_options(parser, HISTORY_OPTIONS)
        add_version_argument(parser, "to show")
        parser.add_argument("--json", action="store_true", help="print JSON")

    @staticmethod
    def main(args: argparse.Namespace) -> int:
        history = open_history(args)
        store = history.store
        version = chosen_version(history, args.version)
        meta = _meta(history, version)
        entry = history.record(version)
        if args.json:
            print(json.dumps(entry.to_dict(), indent=2))
            return 0
        print(f"version {meta.version} of job {store.job!r}, committed {_when(meta.created)} UTC")
        print(f"  parent {meta.parent}, digest {meta.digest}")
        if meta.rollback_of is not None:
            print(f"  rollback to version {meta.rollback_of}")
        print(f"  metrics: {_score(meta.metrics)}")
        spent = privacy.summary(meta.config, meta.epsilon, meta.dp_steps)
        if spent:
            print(f"  privacy: {spent}")
        print("  aggregation: " + ", ".join(f"{key}={value}" for key, value in (meta.config or {}).items()))
        print(f"  {len(entry.updates)} update(s) applied, in order:")
        for update in entry.updates:
            print(
                f"    task {update.task_id}  worker {update.worker_id}  base {update.base_version}  "
                f"staleness {update.staleness}  weight {update.weight:.4g}  examples {update.num_examples}"
            )
        return 0


class Export:
    HELP = "Write one version's weights to a safetensors file that loads into the task's torch model."

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_options(parser, HISTORY_OPTIONS)
        add_version_argument(parser, "to write")
        parser.add_argument("-o", "--output", required=True, help="file to write, e.g. model.safetensors")

    @staticmethod
    def main(args: argparse.Namespace) -> int:
        from safetensors import SafetensorError
        from safetensors.numpy import save_file

        from fedq.coordinator.ops.replay import ReplayError, reconstruct

        history = open_history(args)
        store = history.store
        version = chosen_version(history, args.version)
        meta = _meta(history, version)
        try:
            weights = reconstruct(history, version)
        except (ReplayError, StoreError, ArchiveError) as error:
            raise UserError(str(error)) from None
        task, task_params = store.status.previous_task() or (None, {})
        try:
            save_file(
                dict(weights),
                args.output,
                metadata={
                    "fedq_job": store.job,
                    "fedq_version": str(version),
                    "fedq_digest": meta.digest,
                    "fedq_task": str(task),
                    "fedq_task_params": json.dumps(task_params),
                },
            )
        except (OSError, SafetensorError) as error:
            raise UserError(f"cannot write {args.output}: {error}") from None
        print(
            f"wrote version {version} of job {store.job!r} to {args.output} "
            f"(load with safetensors.torch.load_file and model.load_state_dict)"
        )
        return 0


class Replay:
    HELP = "Recompute versions FROM+1..TO from the logged updates and verify each bit for bit."

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_options(parser, HISTORY_OPTIONS)
        parser.add_argument("--from", dest="start", type=int, default=0, help="start version (default 0)")
        parser.add_argument("--to", dest="end", type=int, default=None, help="last version (default: head)")

    @staticmethod
    def main(args: argparse.Namespace) -> int:
        from fedq.coordinator.ops.replay import ReplayError, replay

        history = open_history(args)
        end = history.last_committed() if args.end is None else args.end
        if end is None:
            raise UserError(f"job {history.job!r} has no versions")
        started = time.monotonic()
        last_shown = [0.0]

        def progress(done: int, total: int) -> None:
            if time.monotonic() - last_shown[0] > 0.5 or done == total:
                last_shown[0] = time.monotonic()
                print(f"\rreplaying: {done}/{total} versions verified", end="", file=sys.stderr, flush=True)

        try:
            result = replay(history, args.start, end, progress)
        except (ReplayError, StoreError, ArchiveError) as error:
            raise UserError(str(error)) from None
        print(file=sys.stderr)
        if result.ok:
            print(
                f"replay of versions {args.start + 1}..{end}: all {len(result.verified)} verified bit for bit "
                f"({time.monotonic() - started:.1f} s)"
            )
            return 0
        assert result.divergence is not None  # not ok: it diverged
        print(result.divergence.describe())
        print(f"{len(result.verified)} version(s) verified before the divergence")
        return 1


class Rollback:
    HELP = "Make an old version the head again, as a new version (history is never rewritten)."

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_options(parser, HISTORY_OPTIONS)
        add_version_argument(parser, "to make the head again")

    @staticmethod
    def main(args: argparse.Namespace) -> int:
        from fedq.coordinator.ops.replay import ReplayError, rollback

        history = open_history(args)
        store = history.store
        version = chosen_version(history, args.version)
        try:
            new_version = rollback(history, version)
        except (ReplayError, StoreError, ArchiveError) as error:
            raise UserError(str(error)) from None
        print(
            f"version {new_version} of job {store.job!r} is version {version} again; "
            f"updates based on versions {version + 1}..{new_version - 1} will be refused"
        )
        return 0
