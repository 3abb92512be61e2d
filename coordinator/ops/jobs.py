"""A job's lifecycle on shared servers: ``fedq jobs`` lists every job, ``fedq delete`` removes one.

A job is everything under its name: Redis keys ``fedq:{<job>}:*`` (hot tier),
queues and exchanges ``fedq.<job>.*`` (RabbitMQ), and the archive segments
under ``<archive>/<job>/`` (cold tier). Jobs are found from Redis alone: a job
whose coordinator started has a ``spec`` key, one that committed a version a
``head`` key.

Neither command imports torch: listing jobs should take well under a second.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, dataclass

import pika.exceptions

from fedq.broker.connection import connect
from fedq.broker.topology import Topology
from fedq.common.cli import UserError, human_size
from fedq.common.settings import CONNECTION_OPTIONS, JOB_NAME_PATTERN, Option, add_options, redact_url, resolve
from fedq.common.store import ModelStore, connect_every_master
from fedq.common.store.archive import Archive, normalise_url
from fedq.coordinator.ops.status import ArchiveReader, remove_job

# A job's key that only a coordinator writes: the signed description (from the coordinator's
# start) or the head (from its first commit). Worker liveness or update blobs alone make no job.
JOB_MARKER_KEYS = ("spec", "head")
_JOB_MARKER = re.compile(r"fedq:\{(?P<job>[^{}]+)\}:(?:spec|head)")
# `jobs` keeps `--job` so that a job file (`--config site.toml`, which names its job) is accepted
# as it is by every other command; not given, it lists every job. No job name holds a space.
EVERY_JOB = "every job"
LIST_OPTIONS = [Option("job", CONNECTION_OPTIONS[0].parse, EVERY_JOB, "list only this job")] + CONNECTION_OPTIONS[1:]
# A coordinator that changed its state, committed a version or was seen by a worker within this
# long counts as alive (it writes its state only when it starts and stops, so the other signs matter).
ALIVE_WITHIN_SECONDS = 120.0


def find_jobs(client) -> list[str]:
    """Names of the jobs that have a description or a head in Redis, sorted. SCAN, not KEYS:
    the server keeps answering other clients while we walk a large keyspace."""
    names = set()
    for marker in JOB_MARKER_KEYS:
        for key in client.scan_iter(match=f"fedq:{{*}}:{marker}", count=1000):
            match = _JOB_MARKER.fullmatch(key.decode(errors="replace"))
            if match and JOB_NAME_PATTERN.fullmatch(match["job"]):
                names.add(match["job"])
    return sorted(names)


@dataclass
class JobSummary:
    job: str
    status: str | None  # running / stopped / finished / failed; None before a coordinator ran
    head: int | None  # the last committed version; None before the first commit
    workers: int  # workers alive now
    redis_bytes: int  # memory Redis uses for the job's keys
    archive_url: str | None  # where the job's segments go (None: it keeps its history in Redis only)
    archive_bytes: int | None  # None when there is no archive, or it cannot be read
    archive_problem: str | None = None


def job_archive_url(archive_url: str, job: str) -> str:
    """Where the job's segments are: its folder under the archive root (as ``JobArchive.url``)."""
    return f"{normalise_url(archive_url).rstrip('/')}/{job}"


def summarise(store: ModelStore, archives: ArchiveReader) -> JobSummary:
    # The reader gives up on an archive that does not answer (an object store down) after a few
    # seconds and reports why, rather than hanging the listing.
    root, archive_bytes, problem = store.status.archive_url(), None, None
    if root is not None:
        archive_bytes, problem = archives.size(root, store.job)
    return JobSummary(
        job=store.job,
        status=store.status.load().get("status"),
        head=store.versions.last_committed(),
        workers=len(store.workers.live()),
        redis_bytes=sum(store.memory_usage().values()),
        archive_url=None if root is None else job_archive_url(root, store.job),
        archive_bytes=archive_bytes,
        archive_problem=problem,
    )


def _dash(value) -> str:
    return "-" if value is None else str(value)


class Jobs:
    HELP = (
        "List every job in Redis: status, head version, live workers, Redis memory, and the size and "
        "location of its archive."
    )

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_options(parser, LIST_OPTIONS)
        parser.add_argument("--json", action="store_true", help="print a JSON list for scripts")

    @staticmethod
    def main(args: argparse.Namespace) -> int:
        values = resolve(args, LIST_OPTIONS)
        url = values["redis_url"]
        if values["job"] == EVERY_JOB:
            # (on a Redis Cluster, each master holds the jobs whose slots it serves)
            names = sorted({name for client in connect_every_master(url) for name in find_jobs(client)})
        else:
            store = ModelStore.open(url, values["job"])
            names = [store.job] if store.redis.exists(store.keys.spec, store.keys.head) else []
        archives = ArchiveReader()
        summaries = [summarise(ModelStore.open(url, name), archives) for name in names]
        if args.json:
            print(json.dumps([asdict(summary) for summary in summaries], indent=2))
            return 0
        if not summaries:
            which = "jobs" if values["job"] == EVERY_JOB else f"job {values['job']!r}"
            print(f"no {which} in Redis at {redact_url(values['redis_url'])}")
            return 0
        width = max(len("job"), *(len(summary.job) for summary in summaries))
        print(
            f"{'job':<{width}}  {'status':<8}  {'head':>6}  {'workers':>7}  {'redis':>10}  {'archive':>10}  archive URL"
        )
        for summary in summaries:
            archive_size = (
                "?"
                if summary.archive_problem
                else ("-" if summary.archive_bytes is None else human_size(summary.archive_bytes))
            )
            print(
                f"{summary.job:<{width}}  {_dash(summary.status):<8}  {_dash(summary.head):>6}  "
                f"{summary.workers:>7}  {human_size(summary.redis_bytes):>10}  {archive_size:>10}  "
                f"{_dash(summary.archive_url)}"
            )
        for summary in summaries:
            if summary.archive_problem:
                print(f"job {summary.job!r}: {summary.archive_problem}", file=sys.stderr)
        return 0


@dataclass
class QueueState:
    name: str
    exists: bool
    consumers: int = 0


def inspect_queues(channel_factory, job: str) -> list[QueueState]:
    """Which of the job's queues exist, and their consumers (a passive declare; a missing queue
    closes the channel, hence one channel per queue)."""
    states = []
    for name in Topology(job).queues:
        channel = channel_factory()
        try:
            frame = channel.queue_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker:
            states.append(QueueState(name, exists=False))
            continue
        states.append(QueueState(name, exists=True, consumers=frame.method.consumer_count))
        channel.close()
    return states


def signs_of_life(store: ModelStore, queues: list[QueueState], now: float) -> list[str]:
    """Why the job's coordinator looks alive (empty: it looks gone), judged only when its state says running."""
    state = store.status.load()
    if state.get("status") != "running":
        return []
    signs = []
    if now - float(state.get("updated") or 0) < ALIVE_WITHIN_SECONDS:
        signs.append(f"its coordinator started {now - float(state['updated']):.0f} s ago")
    newest = store.versions.recent_history(1)
    if newest and now - newest[-1].created < ALIVE_WITHIN_SECONDS:
        signs.append(f"version {newest[-1].version} was committed {now - newest[-1].created:.0f} s ago")
    consumers = sum(queue.consumers for queue in queues if queue.name.endswith(".updates"))
    if consumers:
        signs.append(f"{consumers} consumer(s) read its update queue")
    workers = store.workers.live()
    if workers:
        signs.append(f"{len(workers)} worker(s) are alive")
    return signs


class Delete:
    HELP = (
        "Delete a job: its Redis keys, its queues and exchanges, and with --archive its archive segments. "
        "Asks to type the job name unless --yes; refuses a job whose coordinator looks alive unless --force."
    )

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("job_name", nargs="?", metavar="JOB", help="the job to delete (or --job JOB)")
        add_options(parser, CONNECTION_OPTIONS)
        parser.add_argument(
            "--archive",
            action="store_true",
            help="also delete the job's archive segments (the history moved out of Redis)",
        )
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        parser.add_argument(
            "--force",
            action="store_true",
            help="delete even if the job's coordinator looks alive (it may write keys again)",
        )

    @staticmethod
    def main(args: argparse.Namespace) -> int:
        # The job must be named on the command line: a FEDQ_JOB variable or a job file
        # left in place should never choose what gets deleted.
        if args.job_name and args.job and args.job_name != args.job:
            raise UserError(f"two different jobs named ({args.job_name!r} and --job {args.job!r}); name one")
        if not (args.job_name or args.job):
            raise UserError("name the job to delete on the command line: fedq delete JOB (or --job JOB)")
        args.job = args.job or args.job_name
        values = resolve(args, CONNECTION_OPTIONS)
        job, amqp_url = values["job"], values["amqp_url"]
        store = ModelStore.open(values["redis_url"], job)

        # Everything is looked at before anything is deleted: RabbitMQ down, or the archive
        # unreadable, must leave the job whole rather than half gone.
        keys = sum(1 for _ in store.redis.scan_iter(match=store.keys.all(), count=1000))
        connection = connect(amqp_url, name="fedq-delete", attempts=2)
        try:
            queues = inspect_queues(connection.channel, job)
        finally:
            connection.close()
        job_archive, archive_bytes = None, 0
        recorded_url = store.status.archive_url()
        if args.archive and recorded_url is not None:
            size, problem = ArchiveReader().size(recorded_url, job)
            if problem is not None or size is None:  # (None, problem) when it cannot be read
                raise UserError(
                    f"cannot read the archive {job_archive_url(recorded_url, job)} ({problem}); nothing deleted"
                )
            archive_bytes = size
            job_archive = Archive(recorded_url).job(job)
        existing_queues = [queue.name for queue in queues if queue.exists]
        if not keys and not existing_queues and not archive_bytes:
            raise UserError(
                f"job {job!r} has no keys in Redis at {redact_url(values['redis_url'])} and no queues "
                f"in RabbitMQ; nothing to delete"
            )

        signs = signs_of_life(store, queues, time.time())
        if signs and not args.force:
            raise UserError(f"job {job!r} is running ({'; '.join(signs)}); stop its coordinator first, or add --force")
        archive_note = (
            f", and {human_size(archive_bytes)} of archive segments in {job_archive.url}"
            if job_archive is not None
            else ""
        )
        plan = f"{keys} Redis key(s), {len(existing_queues)} queue(s){archive_note}"
        if not args.yes:
            confirm(job, plan)

        if job_archive is not None:
            # The archive goes first: its URL is recorded in Redis, so if this fails the
            # same command can be run again; the other way round the URL would be lost.
            try:
                job_archive.delete()
            except OSError as error:
                raise UserError(f"cannot delete the archive {job_archive.url}: {error}; nothing else deleted") from None
        remove_job(amqp_url, store)
        print(
            f"deleted job {job!r}: {keys} Redis key(s); queues and exchanges "
            f"{', '.join(existing_queues) or '(none existed)'}"
            + (
                f"; {human_size(archive_bytes)} ({archive_bytes} bytes) of archive segments in {job_archive.url}"
                if job_archive is not None
                else ""
            )
        )
        if recorded_url is not None and job_archive is None:
            print(f"kept its archive in {job_archive_url(recorded_url, job)} (add --archive to delete it too)")
        if args.archive and recorded_url is None:
            print("it had no archive recorded in Redis")
        return 0


def confirm(job: str, plan: str) -> None:
    """Ask the user to type the job name; raise UserError unless they do."""
    if not sys.stdin.isatty():
        raise UserError(f"refusing to delete job {job!r} without confirmation, as input is not a terminal; add --yes")
    print(f"This deletes job {job!r}: {plan}. It cannot be undone.")
    try:
        typed = input("Type the job name to confirm: ")
    except EOFError:
        typed = ""
    if typed.strip() != job:
        raise UserError(f"not confirmed; job {job!r} was not deleted")
