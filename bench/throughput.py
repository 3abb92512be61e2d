"""Coordinator throughput: updates applied per second, with workers that answer instantly.

Run from the repository root (the coordinator loads ``bench.models:MLPTask`` by module path):

    .venv/bin/python bench/throughput.py                 # ~2 minutes
    .venv/bin/python bench/throughput.py --quick         # ~30 s
    .venv/bin/python bench/throughput.py --quick --profile  # + py-spy breakdown of the coordinator
    .venv/bin/python bench/throughput.py --wait-quiet 60 --retries 2   # on a shared machine
    .venv/bin/python bench/throughput.py --only 1M --python-packer     # experiment, see python_packer.py

For each (model size, algorithm) it starts a real coordinator subprocess
(``python -m fedq.common.cli coordinator ... --eval-every 0 --max-versions N``) on a
fresh job, plus fake workers (threads in this process, one pika connection
each) that answer every task at once with an all-zeros delta, encoded exactly
as ``worker.service`` does: inline when the safetensors payload is <= 256 KiB,
else SET in Redis first and sent as a claim check (key, sha256, nbytes). Each
update is published with publisher confirms before its task is acked.

Throughput is read back from the job's Redis history: the ``created`` time of
each version (stamped in ``ModelStore.commit`` just before the weights blob is
SET), skipping a warm-up. Alongside it, the same run reports the coordinator's
own ``aggregation_seconds`` (aggregator step + server optimizer, from version
metadata) and a plain numpy ``acc += w * x`` over as many float32 elements,
so one sees how much of a server step is arithmetic and how much is I/O,
serialisation and bookkeeping. Every job is deleted afterwards (Redis keys and
RabbitMQ queues/exchanges).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pika.exceptions  # noqa: E402

from bench.models import LARGE, SMALL, MLPTask, parameter_count  # noqa: E402
from bench.python_packer import use_python_packer  # noqa: E402
from fedq.broker.connection import connect  # noqa: E402
from fedq.broker.publisher import publish  # noqa: E402
from fedq.broker.topology import Topology  # noqa: E402
from fedq.coordinator.ops.status import remove_job  # noqa: E402
from fedq.common.wire import codec  # noqa: E402
from fedq.common.wire.messages import ClaimCheck, InlineDelta, ModelUpdate, parse_task  # noqa: E402
from fedq.common.settings import DEFAULT_AMQP_URL, DEFAULT_REDIS_URL  # noqa: E402
from fedq.common.store import ModelStore, connect_redis  # noqa: E402
from fedq.common.wire.limits import INLINE_LIMIT_BYTES, UPDATE_BLOB_TTL_SECONDS  # noqa: E402

TASK = "bench.models:MLPTask"


@dataclass(frozen=True)
class Config:
    model: str          # label, e.g. "10k"
    sizes: tuple[int, ...]
    algorithm: str      # fedasync | fedbuff
    buffer_size: int    # updates per version (1 for fedasync)
    versions: int       # --max-versions (full run)
    quick_versions: int

    @property
    def parameters(self) -> int:
        return parameter_count(list(self.sizes))


# Version counts sized so that each run takes ~20 s (quick: ~5 s) on a 2-core machine.
CONFIGS = [
    Config("10k", tuple(SMALL), "fedasync", 1, 4000, 400),
    Config("10k", tuple(SMALL), "fedbuff", 10, 500, 60),
    Config("1M", tuple(LARGE), "fedasync", 1, 400, 80),
    Config("1M", tuple(LARGE), "fedbuff", 10, 90, 20),
]


# -- fake workers ------------------------------------------------------------

class FakeWorkers:
    """Threads that answer each task immediately with a precomputed all-zeros delta."""

    def __init__(self, job: str, amqp_url: str, redis_url: str, weights: codec.Weights, threads: int,
                 prefetch: int):
        self.job, self.amqp_url, self.redis_url = job, amqp_url, redis_url
        self.topology = Topology(job)
        self.prefetch = prefetch
        self.payload = codec.encode({name: np.zeros_like(array) for name, array in weights.items()})
        self.inline = len(self.payload) <= INLINE_LIMIT_BYTES
        self.sha256 = codec.digest(self.payload)
        self.stop = threading.Event()
        self.ready = threading.Barrier(threads + 1)
        self.done = [0] * threads
        self.errors: list[BaseException] = []
        self.threads = [threading.Thread(target=self._run, args=(index,), name=f"fake-worker-{index}", daemon=True)
                        for index in range(threads)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        self.ready.wait(timeout=30)

    def close(self) -> int:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)
        return sum(self.done)

    def _run(self, index: int) -> None:
        worker_id = f"bench-{index}"
        connection = None
        try:
            store = ModelStore(connect_redis(self.redis_url), self.job)
            connection = connect(self.amqp_url, name=f"fedq-bench-{worker_id}")
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=self.prefetch)
            self.ready.wait(timeout=30)
            for method, _properties, body in channel.consume(self.topology.tasks, inactivity_timeout=0.1):
                if self.stop.is_set():
                    break
                if method is None:
                    continue
                task = parse_task(body)
                if self.inline:
                    carried: InlineDelta | ClaimCheck = InlineDelta(self.payload)
                else:
                    # As fedq.worker.training: the blob is in Redis before the message naming it exists.
                    key = store.blobs.put(task.task_id, self.payload, UPDATE_BLOB_TTL_SECONDS)
                    carried = ClaimCheck(key=key, sha256=self.sha256, nbytes=len(self.payload))
                update = ModelUpdate(job=task.job, task_id=task.task_id, worker_id=worker_id,
                                     base_version=task.model_version, num_examples=8, delta=carried)
                publish(channel, self.topology.updates, update.to_bytes(), message_id=task.task_id)
                channel.basic_ack(method.delivery_tag)
                self.done[index] += 1
            channel.cancel()
        except (pika.exceptions.ChannelClosed, pika.exceptions.ConnectionClosed, pika.exceptions.StreamLostError) \
                as error:
            if not self.stop.is_set():
                self.errors.append(error)
        except BaseException as error:  # reported by the main thread
            self.errors.append(error)
            try:
                self.ready.abort()
            except threading.BrokenBarrierError:
                pass
        finally:
            if connection is not None and connection.is_open:
                try:
                    connection.close()
                except Exception:
                    pass


# -- reference arithmetic ----------------------------------------------------

def numpy_add_seconds(elements: int, repeats: int = 30) -> float:
    """Median time of ``acc += w * x`` over ``elements`` float32 values (one update's math)."""
    acc = np.zeros(elements, dtype=np.float32)
    x = np.ones(elements, dtype=np.float32)
    w = np.float32(0.5)
    number = max(1, 200_000 // elements)

    def step():
        nonlocal acc
        acc += w * x

    step()
    return statistics.median(timeit.repeat(step, number=number, repeat=repeats)) / number


# -- CPU use of the parties during the measured window ----------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# A run during which other processes kept more than this share of a core busy is suspect.
BUSY_OTHER = 0.3


def _proc_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from /proc (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _machine_busy_seconds() -> float:
    """CPU seconds all cores spent busy (not idle/iowait), from /proc/stat."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def wait_for_quiet_machine(limit_seconds: float, threshold: float = 0.3) -> float:
    """Wait (up to ``limit_seconds``) until the machine is less than ``threshold`` cores busy; returns the load."""
    deadline = time.monotonic() + limit_seconds
    while True:
        before = _machine_busy_seconds()
        time.sleep(1.0)
        busy = _machine_busy_seconds() - before
        if busy < threshold or time.monotonic() > deadline:
            return busy


def _find_pids(comm: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


class CpuMonitor:
    """Samples (time, head, CPU seconds of each party) so the measured window's CPU use can be derived.

    Parties: the coordinator process, this process (the fake workers; its main thread
    only sleeps and samples), the Redis server (INFO cpu), RabbitMQ (beam.smp, if
    visible in /proc), and "other": the machine's busy time (/proc/stat) minus all
    of those. On 2 cores the total can reach 200%.
    """

    def __init__(self, pid: int, store: ModelStore, profiled: bool):
        self.pid, self.store, self.profiled = pid, store, profiled
        self.coordinator_pid: int | None = None if profiled else pid
        self.rabbit_pids = _find_pids("beam.smp")
        self.samples: list[tuple[float, int, dict[str, float]]] = []
        self.memory: list[tuple[int, int]] = []  # (head, Redis used_memory)

    def _coordinator(self) -> int | None:
        if self.coordinator_pid is None:  # under py-spy: the coordinator is py-spy's child
            try:
                children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            except OSError:
                children = []
            self.coordinator_pid = int(children[0]) if children else None
        return self.coordinator_pid

    def sample(self) -> None:
        try:
            head = self.store.versions.head()
            info = self.store.redis.info("cpu")
            memory = self.store.redis.info("memory")["used_memory"]
        except Exception:
            return
        if head is None:
            return
        cpu: dict[str, float] = {"fake workers": time.process_time(),
                                 "redis": info["used_cpu_user"] + info["used_cpu_sys"]}
        pid = self._coordinator()
        coordinator = _proc_cpu_seconds(pid) if pid is not None else None
        if coordinator is None:
            return
        cpu["coordinator"] = coordinator
        rabbit = [_proc_cpu_seconds(pid) for pid in self.rabbit_pids]
        if self.rabbit_pids and None not in rabbit:
            cpu["rabbitmq"] = sum(rabbit)
        cpu["machine"] = _machine_busy_seconds()
        self.samples.append((time.monotonic(), head, cpu))
        self.memory.append((head, memory))

    def memory_per_version(self) -> float:
        """Redis bytes added per committed version over the run (nothing is ever pruned)."""
        if len(self.memory) < 2 or self.memory[-1][0] <= self.memory[0][0]:
            return float("nan")
        (head0, used0), (head1, used1) = self.memory[0], self.memory[-1]
        return (used1 - used0) / (head1 - head0)

    def usage(self, first_version: int) -> dict[str, float]:
        window = [sample for sample in self.samples if sample[1] >= first_version]
        if len(window) < 2:
            return {}
        (t0, _, cpu0), (t1, _, cpu1) = window[0], window[-1]
        if t1 - t0 < 0.5:
            return {}
        usage = {name: (cpu1[name] - cpu0[name]) / (t1 - t0) for name in cpu1 if name in cpu0}
        # Everything else busy on the machine (py-spy, other users' processes, the kernel).
        usage["other"] = max(0.0, usage.pop("machine") - sum(usage.values()))
        return usage


# -- one run -------------------------------------------------------------------

@dataclass
class Result:
    config: Config
    versions: int = 0
    measured: int = 0
    interval_median: float = float("nan")
    interval_p90: float = float("nan")
    updates_per_s_median: float = float("nan")
    updates_per_s_mean: float = float("nan")
    aggregation_median: float = float("nan")
    numpy_add: float = float("nan")
    mean_staleness: float = float("nan")
    payload_bytes: int = 0
    inline: bool = True
    worker_updates: int = 0
    wall_seconds: float = 0.0
    redis_bytes_per_version: float = float("nan")
    redis_peak_bytes: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # process -> share of one core, measured window
    notes: list[str] = field(default_factory=list)


def run_config(config: Config, args: argparse.Namespace, numpy_add: float) -> Result:
    result = Result(config, numpy_add=numpy_add)
    versions = config.quick_versions if args.quick else config.versions
    if args.versions_scale != 1.0:
        versions = max(10, int(versions * args.versions_scale))
    job = f"bench-{config.model}-{config.algorithm}-{uuid.uuid4().hex[:8]}"
    topology = Topology(job)
    store = ModelStore(connect_redis(args.redis_url), job)
    weights = MLPTask(list(config.sizes)).initial_weights(0)

    # Declared here first so the fake workers can consume before the coordinator is up.
    connection = connect(args.amqp_url, name="fedq-bench-admin")
    topology.declare(connection.channel())
    connection.close()

    workers = FakeWorkers(job, args.amqp_url, args.redis_url, weights, threads=args.worker_threads,
                          prefetch=max(1, args.concurrency))
    result.payload_bytes, result.inline = len(workers.payload), workers.inline
    entry_point = "bench.python_packer" if args.python_packer else "fedq.common.cli"
    command = [sys.executable, "-m", entry_point, "coordinator", "--job", job, "--task", TASK,
               "--task-params", json.dumps({"sizes": list(config.sizes)}), "--algorithm", config.algorithm,
               "--concurrency", str(args.concurrency), "--eval-every", "0", "--max-versions", str(versions),
               "--max-seconds", str(args.max_seconds), "--log-level", args.log_level,
               "--amqp-url", args.amqp_url, "--redis-url", args.redis_url]
    if config.algorithm == "fedbuff":
        command += ["--buffer-size", str(config.buffer_size)]
    command += shlex.split(args.coordinator_args)
    profile_path = None
    if args.profile:
        profile_path = Path(args.profile_dir) / f"{config.model}-{config.algorithm}.txt"
        command = [args.py_spy, "record", "--idle", "--rate", "250", "--format", "raw", "--output",
                   str(profile_path), "--"] + command
    log_path = Path(args.log_dir) / f"{config.model}-{config.algorithm}.log"
    started = time.monotonic()
    process = None
    try:
        workers.start()
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(command, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
            monitor = CpuMonitor(process.pid, store, profiled=args.profile)
            deadline = time.monotonic() + args.max_seconds + 60
            while process.poll() is None:
                if time.monotonic() > deadline:
                    process.kill()
                    process.wait()
                    raise RuntimeError(f"coordinator of {job} did not finish; see {log_path}")
                monitor.sample()
                time.sleep(0.25)
            code = process.returncode
        if code != 0:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"coordinator of {job} exited with {code}:\n{tail}")
        result.wall_seconds = time.monotonic() - started
        result.worker_updates = workers.close()
        if workers.errors:
            raise RuntimeError(f"fake worker failed: {workers.errors[0]!r}")
        analyse(result, store.versions.history(), args)
        if result.measured:
            result.cpu = monitor.usage(first_version=result.versions - result.measured)
        result.redis_bytes_per_version = monitor.memory_per_version()
        result.redis_peak_bytes = max((used for _, used in monitor.memory), default=0)
        if profile_path is not None:
            result.notes.append(f"profile: {profile_path}")
            result.notes.extend(summarise_profile(profile_path))
    finally:
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()
        workers.close()
        cleanup(job, args)
    return result


def analyse(result: Result, history: list[dict], args: argparse.Namespace) -> None:
    entries = sorted(history, key=lambda entry: entry.version)
    result.versions = entries[-1].version if entries else 0
    # Version 0 is the initial model; skip it and a warm-up (connection set-up,
    # first allocations, the workers' first prefetch filling the pipeline).
    warmup = max(args.warmup, int(len(entries) * args.warmup_fraction))
    window = entries[1 + warmup:]
    if len(window) < 3:
        result.notes.append(f"only {len(entries)} versions committed: too few to measure")
        return
    created = [entry.created for entry in entries]
    intervals = [created[index] - created[index - 1] for index in range(1 + warmup, len(entries))]
    result.measured = len(intervals)
    result.interval_median = statistics.median(intervals)
    result.interval_p90 = float(np.percentile(intervals, 90))
    result.updates_per_s_median = result.config.buffer_size / result.interval_median
    span = created[-1] - created[warmup]
    result.updates_per_s_mean = sum(entry.updates_applied for entry in window) / span
    result.aggregation_median = statistics.median(entry.aggregation_seconds for entry in window)
    result.mean_staleness = statistics.fmean(entry.mean_staleness for entry in window)


def cleanup(job: str, args: argparse.Namespace) -> None:
    remove_job(args.amqp_url, ModelStore(connect_redis(args.redis_url), job))


# -- py-spy profile summary ------------------------------------------------------

# (label, substrings that must all occur in a sample's stack): the first matching
# entry names the sample's bucket, so the more specific entries come first.
PROFILE_BUCKETS = [
    ("Redis SET of the new weights blob (commit)", ("VersionStore.commit (", "BasicKeyCommands.set (")),
    ("Redis SET of the new weights blob (commit)", ("VersionStore.commit (", "Pipeline.execute (")),
    ("retention: VersionStore.prune", ("VersionStore.prune (",)),
    ("Redis Lua commit script", ("VersionStore.commit (", "Script.__call__ (")),
    ("sha256 (claim check + version digest)", ("digest (common/wire/codec.py",)),
    ("safetensors encode of the new version", ("encode (common/wire/codec.py",)),
    ("Redis GET of a claim-checked delta", ("UpdateBlobs.get (",)),
    ("safetensors decode of a delta", ("decode (common/wire/codec.py",)),
    ("isfinite check of a delta", ("check_tensors (",)),
    ("aggregation step", ("step (coordinator/algorithms/aggregation.py",)),
    ("server optimizer", ("apply (coordinator/algorithms/server_optimizers.py",)),
    ("json, weights copy, rest of store.commit", ("VersionStore.commit (",)),
    ("publish a task + wait for its confirm", ("publish (broker/publisher.py",)),
    ("Redis HSET in-flight (dispatch)", ("record_dispatch (",)),
    ("Redis HDEL in-flight (forget)", ("TaskLedger.forget (",)),
    ("Redis HGET applied (duplicate check)", ("applied_version (",)),
    ("basic_ack of updates", ("basic_ack (",)),
    ("parse update (JSON, base64)", ("parse_update (",)),
    ("logging", ("(logging/",)),
    ("idle: waiting for the next update", ("consume (",)),
]


def summarise_profile(path: Path, top: int = 14) -> list[str]:
    """Share of the coordinator's main-thread wall-clock samples per activity, inside the serve loop."""
    if not path.exists():
        return ["(no profile written)"]
    buckets: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if "_serve (coordinator/service/loop.py" not in stack:
            continue  # start-up (imports, model build, version 0) and other threads
        count = int(count_text)
        total += count
        label = next((name for name, needles in PROFILE_BUCKETS if all(needle in stack for needle in needles)),
                     None)
        buckets[label or "other: " + stack.split(";")[-1].split(" (")[0]] += count
    if not total:
        return ["(no samples inside Coordinator._serve)"]
    lines = [f"  {count / total:6.1%}  {label}" for label, count in buckets.most_common(top)]
    return [f"coordinator serve loop, wall-clock share by activity ({total} py-spy samples):"] + lines


# -- output ------------------------------------------------------------------------

def fmt_ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1e3:.2f}"


def print_table(results: list[Result]) -> None:
    headers = ["model", "params", "algorithm", "delta", "upd/s med", "upd/s mean", "commit ms med", "p90 ms",
               "aggr ms med", "numpy ms/version", "interval/numpy", "aggr/interval"]
    rows = []
    for result in results:
        config = result.config
        math_ms = result.numpy_add * config.buffer_size
        rows.append([
            config.model, f"{config.parameters:,}",
            config.algorithm if config.algorithm == "fedasync" else f"fedbuff K={config.buffer_size}",
            f"{'inline' if result.inline else 'claim'} {result.payload_bytes / 1024:.0f} KiB",
            f"{result.updates_per_s_median:.1f}", f"{result.updates_per_s_mean:.1f}",
            fmt_ms(result.interval_median), fmt_ms(result.interval_p90), fmt_ms(result.aggregation_median),
            f"{math_ms * 1e3:.3f}",
            f"{result.interval_median / math_ms:.0f}x" if math_ms else "n/a",
            f"{result.aggregation_median / result.interval_median:.1%}",
        ])
    widths = [max(len(str(row[i])) for row in rows + [headers]) for i in range(len(headers))]
    line = "  ".join(header.rjust(width) for header, width in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)))
    print()
    print("upd/s med      = updates per version / median commit interval; upd/s mean = updates applied / elapsed")
    print("commit ms      = time between consecutive versions' 'created' stamps (one server step, all I/O included)")
    print("aggr ms        = coordinator's own aggregation_seconds (aggregator step + server optimizer)")
    print("numpy ms/ver.  = plain numpy `acc += w*x` over the same float32 count, x updates per version")
    print("interval/numpy = commit interval / that numpy time; aggr/interval = share of a step spent in the math")
    parties = ["coordinator", "fake workers", "redis", "rabbitmq", "other"]
    if any(result.cpu for result in results):
        print()
        print("CPU use during the measured window, % of one core (this machine has "
              f"{os.cpu_count()} cores; the fake workers run in the benchmark process):")
        print(f"{'model':>6}  {'algorithm':<13}" + "".join(f"{party:>14}" for party in parties) + f"{'total':>10}")
        for result in results:
            cells = [result.cpu.get(party) for party in parties]
            total = sum(cell for cell in cells if cell is not None)
            print(f"{result.config.model:>6}  {result.config.algorithm:<13}"
                  + "".join(f"{'n/a' if cell is None else f'{cell:.0%}':>14}" for cell in cells)
                  + f"{total:>10.0%}")
        if any(result.cpu.get("other", 0) > BUSY_OTHER for result in results):
            print(f"NOTE: 'other' > {BUSY_OTHER:.0%} of a core: something else was busy on this machine; figures are pessimistic.")
    print()
    print("Redis memory growth per version (the server's used_memory, so other jobs' writes count too). By default")
    print("every version's weights and every applied update's delta are kept; see --coordinator-args='--keep-versions N'):")
    for result in results:
        print(f"{result.config.model:>6}  {result.config.algorithm:<13}  "
              f"+{result.redis_bytes_per_version / 2**20:8.2f} MiB/version   "
              f"server used_memory peak {result.redis_peak_bytes / 2**20:8.0f} MiB after {result.versions} versions")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer versions per run (~30 s in all)")
    parser.add_argument("--only", default="", help="comma-separated filter, e.g. 10k or 1M,fedbuff")
    parser.add_argument("--concurrency", type=int, default=4, help="coordinator --concurrency (default 4)")
    parser.add_argument("--worker-threads", type=int, default=2, help="fake worker threads (default 2)")
    parser.add_argument("--versions-scale", type=float, default=1.0, help="multiply every run's --max-versions")
    parser.add_argument("--warmup", type=int, default=5, help="versions skipped at the start (at least)")
    parser.add_argument("--warmup-fraction", type=float, default=0.1, help="... or this fraction, if more")
    parser.add_argument("--max-seconds", type=float, default=45.0, help="coordinator --max-seconds cap per run")
    parser.add_argument("--coordinator-args", default="",
                        help="extra coordinator flags, e.g. '--keep-versions 20' (quoted, one string)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to this long for the machine to be idle (shared hosts)")
    parser.add_argument("--retries", type=int, default=0,
                        help="run a configuration again (up to N times) when other processes were busy during it; "
                             "the least disturbed run is reported")
    parser.add_argument("--python-packer", action="store_true",
                        help="experiment: coordinator and fake workers pack Redis commands with redis-py's "
                             "pure-Python packer instead of hiredis (see bench/python_packer.py)")
    parser.add_argument("--log-level", default="INFO", help="coordinator log level (logs go to --log-dir)")
    parser.add_argument("--log-dir", default=None, help="where coordinator logs go (default: a temp dir)")
    parser.add_argument("--profile", action="store_true", help="run each coordinator under py-spy record --idle")
    parser.add_argument("--profile-dir", default=None, help="where py-spy raw profiles go (default: --log-dir)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--amqp-url", default=os.environ.get("FEDQ_AMQP_URL", DEFAULT_AMQP_URL))
    parser.add_argument("--redis-url", default=os.environ.get("FEDQ_REDIS_URL", DEFAULT_REDIS_URL))
    args = parser.parse_args(argv)
    if Path.cwd().resolve() != ROOT:
        os.chdir(ROOT)  # the coordinator imports bench.models from the working directory
    args.log_dir = args.log_dir or tempfile.mkdtemp(prefix="fedq-bench-")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    args.profile_dir = args.profile_dir or args.log_dir
    if args.profile:
        args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(args.py_spy).exists():
            parser.error("--profile needs py-spy (.venv/bin/pip install py-spy)")

    if args.python_packer:
        use_python_packer()  # the fake workers' Redis clients, created per run from here on
    filters = [item.strip().lower() for item in args.only.split(",") if item.strip()]
    configs = [config for config in CONFIGS
               if all(item in (config.model.lower(), config.algorithm) for item in filters)
               or not filters]
    print(f"fedq coordinator throughput{' (experiment: Python Redis packer)' if args.python_packer else ''}: "
          f"{len(configs)} runs, concurrency {args.concurrency}, "
          f"{args.worker_threads} fake worker threads, {os.cpu_count()} CPUs; logs in {args.log_dir}", flush=True)
    references: dict[int, float] = {}
    results = []
    started = time.monotonic()
    for config in configs:
        if config.parameters not in references:
            references[config.parameters] = numpy_add_seconds(config.parameters)
        if args.wait_quiet:
            busy = wait_for_quiet_machine(args.wait_quiet)
            if busy >= 0.3:
                print(f"  (machine still {busy:.0%} of a core busy after waiting {args.wait_quiet:.0f} s)", flush=True)
        result = run_config(config, args, references[config.parameters])
        for attempt in range(args.retries):
            if result.cpu.get("other", 0.0) <= BUSY_OTHER:
                break
            print(f"  {config.model:>4} {config.algorithm:<8}: other processes used {result.cpu['other']:.0%} of a core; "
                  f"running again ({attempt + 1}/{args.retries})", flush=True)
            if args.wait_quiet:
                wait_for_quiet_machine(args.wait_quiet)
            again = run_config(config, args, references[config.parameters])
            if again.cpu.get("other", 0.0) < result.cpu.get("other", 0.0):
                result = again
        results.append(result)
        print(f"  {config.model:>4} {config.algorithm:<8}: {result.versions} versions in {result.wall_seconds:.1f} s "
              f"(measured {result.measured}, mean staleness {result.mean_staleness:.2f}), "
              f"{result.updates_per_s_median:.1f} updates/s", flush=True)
        for note in result.notes:
            print(f"      {note}", flush=True)
    print(f"\ntotal {time.monotonic() - started:.0f} s\n")
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps([{
            "model": r.config.model, "parameters": r.config.parameters, "algorithm": r.config.algorithm,
            "buffer_size": r.config.buffer_size, "versions": r.versions, "measured": r.measured,
            "updates_per_s_median": r.updates_per_s_median, "updates_per_s_mean": r.updates_per_s_mean,
            "commit_interval_median_s": r.interval_median, "commit_interval_p90_s": r.interval_p90,
            "aggregation_median_s": r.aggregation_median, "numpy_add_s": r.numpy_add,
            "payload_bytes": r.payload_bytes, "inline": r.inline, "cpu_share": r.cpu,
            "redis_bytes_per_version": r.redis_bytes_per_version, "redis_peak_bytes": r.redis_peak_bytes} for r in results],
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
