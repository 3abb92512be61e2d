"""Publish-confirm latency of a durable quorum queue while another writer fills a disk.

fedq's task and update queues are durable quorum queues: each publish confirm waits for the
broker's log to be synced. This measures how much a coordinator's archiver, writing segments to a
folder, delays those confirms, by writing as an archiver does (4 MB blobs at a steady rate, one
fsync per segment) to ``--folder`` while publishing 450-byte messages with confirms, one after
the other:

    .venv/bin/python bench/confirm_latency.py --writer none
    .venv/bin/python bench/confirm_latency.py --folder ~/.local/share/fedq-confirm-latency
    .venv/bin/python bench/confirm_latency.py --folder /dev/shm/fedq-confirm-latency
    .venv/bin/python bench/confirm_latency.py --folder ~/.local/share/fedq-confirm-latency --sync-mb 16

It prints the median, p90, p99 and the longest confirm. The queue and the writer's file are
removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

import pika

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedq.broker.connection import connect  # noqa: E402
from fedq.broker.topology import QUORUM  # noqa: E402
from fedq.common.settings import DEFAULT_AMQP_URL  # noqa: E402

BLOB_BYTES = 4_000_000  # one 1M-parameter delta


def write_like_an_archiver(folder: Path, mb_per_second: float, segment_mb: int, sync_mb: int, stop: threading.Event):
    """Write 4 MB blobs to a segment file at ``mb_per_second``, fsync every ``sync_mb`` and at each
    segment's end (``segment_mb``), then start the next segment, until ``stop``."""
    folder.mkdir(parents=True, exist_ok=True)
    blob = os.urandom(BLOB_BYTES)
    pause = BLOB_BYTES / (mb_per_second * 1e6)
    path = folder / f"segment-{uuid.uuid4().hex[:8]}.tmp"
    try:
        while not stop.is_set():
            with open(path, "wb") as segment:
                written = unsynced = 0
                while written < segment_mb * 1e6 and not stop.is_set():
                    segment.write(blob)
                    written += BLOB_BYTES
                    unsynced += BLOB_BYTES
                    if sync_mb and unsynced >= sync_mb * 1e6:
                        segment.flush()
                        os.fdatasync(segment.fileno())
                        unsynced = 0
                    time.sleep(pause)
                segment.flush()
                os.fsync(segment.fileno())
    finally:
        path.unlink(missing_ok=True)
        try:
            folder.rmdir()  # only if this run made it and nothing else is there
        except OSError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--writer", choices=("archiver", "none"), default="archiver")
    parser.add_argument("--folder", default=os.path.expanduser("~/.local/share/fedq-confirm-latency"))
    parser.add_argument("--mb-per-second", type=float, default=250.0, help="the writer's rate (60 updates/s of 4 MB)")
    parser.add_argument("--segment-mb", type=int, default=256, help="fsync once per this many MB (a segment)")
    parser.add_argument("--sync-mb", type=int, default=0, help="also fdatasync every this many MB (0: never)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--amqp-url", default=os.environ.get("FEDQ_AMQP_URL", DEFAULT_AMQP_URL))
    args = parser.parse_args(argv)

    connection = connect(args.amqp_url, name="fedq-bench-confirm-latency")
    channel = connection.channel()
    channel.confirm_delivery()
    queue = f"fedq-bench-confirm-latency-{uuid.uuid4().hex[:8]}"
    channel.queue_declare(queue, durable=True, arguments=QUORUM)
    stop = threading.Event()
    writer = None
    if args.writer == "archiver":
        writer = threading.Thread(
            target=write_like_an_archiver,
            args=(Path(args.folder), args.mb_per_second, args.segment_mb, args.sync_mb, stop),
            daemon=True,
        )
        writer.start()
    persistent = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent)
    body = bytes(450)  # an update message carrying a claim check
    latencies: list[float] = []
    try:
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            channel.basic_publish("", queue, body, persistent)  # returns once confirmed
            latencies.append(time.perf_counter() - started)
            if len(latencies) % 1000 == 0:
                channel.queue_purge(queue)
    finally:
        stop.set()
        if writer is not None:
            writer.join()
        channel.queue_delete(queue)
        connection.close()
    latencies.sort()

    def at(share: float) -> str:
        return f"{latencies[min(len(latencies) - 1, int(len(latencies) * share))] * 1e3:.2f}"

    where = "no writer" if writer is None else f"{args.mb_per_second:.0f} MB/s to {args.folder}"
    if writer is not None and args.sync_mb:
        where += f", synced every {args.sync_mb} MB"
    print(
        f"{where}: {len(latencies)} confirms, median {statistics.median(latencies) * 1e3:.2f} ms, "
        f"p90 {at(0.9)}, p99 {at(0.99)}, max {latencies[-1] * 1e3:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
