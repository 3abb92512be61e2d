"""Crash recovery, for real: SIGKILLed coordinators and workers, a restarted Redis, dropped
RabbitMQ connections. Afterwards every update is applied exactly once and the whole
history replays bit for bit."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode

import pytest

from fedq.common.store import ModelStore, connect_redis
from fedq.common.store.tiers import whole_history
from fedq.coordinator.ops.replay import replay
from tests.support import AMQP_URL, REDIS_URL, wait_until

TRAINING = [
    "--task",
    "digits",
    "--task-params",
    json.dumps({"num_partitions": 3}),
    "--local-epochs",
    "2",
    "--learning-rate",
    "0.1",
    "--batch-size",
    "16",
]


def flags(job: str, redis_url: str = REDIS_URL) -> list[str]:
    return ["--job", job, "--amqp-url", AMQP_URL, "--redis-url", redis_url]


def done_task_ids(processes, names) -> set[str]:
    found = set()
    for name in names:
        found |= set(re.findall(r"event=task_done worker=\S+ task=(\w+)", processes.log(name)))
    return found


def assert_exactly_once_and_replayable(store: ModelStore) -> list[str]:
    task_ids = [update.task_id for entry in whole_history(store) for update in entry.updates]
    assert len(task_ids) == len(set(task_ids)), "an update was applied twice"
    result = replay(store, 0, store.versions.head())
    assert result.ok, result.divergence.describe()
    return task_ids


@pytest.mark.parametrize("point", ["buffered", "committed", "dispatched"])
def test_coordinator_killed_at_a_dangerous_point_loses_nothing(processes, job, store, point):
    coordinator_flags = [
        "coordinator",
        *flags(job),
        *TRAINING,
        "--algorithm",
        "fedbuff",
        "--buffer-size",
        "2",
        "--concurrency",
        "3",
        "--max-versions",
        "12",
    ]
    os.environ["FEDQ_CRASH_AT"] = f"{point}:5"
    try:
        crashing = processes.start("coordinator-1", *coordinator_flags)
    finally:
        del os.environ["FEDQ_CRASH_AT"]
    workers = [f"worker-{index}" for index in range(3)]
    for index, name in enumerate(workers):
        processes.start(name, "worker", *flags(job), "--worker-id", f"w{index}", "--partition", str(index))
    assert crashing.wait(timeout=120) == -signal.SIGKILL, processes.log("coordinator-1")[-2000:]
    published_before_crash = done_task_ids(processes, workers)
    restarted = processes.start("coordinator-2", *coordinator_flags)
    assert restarted.wait(timeout=120) == 0, processes.log("coordinator-2")[-3000:]
    assert "event=resumed" in processes.log("coordinator-2")
    assert store.status.load()["reason"] == "max_versions"
    applied = set(assert_exactly_once_and_replayable(store))
    assert published_before_crash <= applied, "an update published before the crash was lost"


def test_long_run_with_random_kills_replays_bit_for_bit(processes, job, store):
    rng = random.Random(7)
    coordinator_flags = ["coordinator", *flags(job), *TRAINING, "--concurrency", "3", "--max-versions", "60"]
    current_worker = {}

    def start_worker(index: int, generation: int) -> None:
        current_worker[index] = processes.start(
            f"worker-{index}-{generation}", "worker", *flags(job), "--worker-id", f"w{index}", "--partition", str(index)
        )

    for index in range(3):
        start_worker(index, 0)
    kills = 0
    for generation in range(4):
        coordinator = processes.start(f"coordinator-{generation}", *coordinator_flags)
        if generation == 3:
            break
        # (wait_until calls the lambda before the loop moves on)
        wait_until(lambda: (store.versions.head() or 0) >= 5 + 10 * generation, 120, "the run made no progress")  # noqa: B023
        time.sleep(rng.uniform(0.0, 1.5))
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait(timeout=10)
        kills += 1
        # A worker dies with it, and comes back.
        victim = rng.randrange(3)
        current_worker[victim].send_signal(signal.SIGKILL)
        start_worker(victim, generation + 1)
    assert coordinator.wait(timeout=180) == 0, processes.log("coordinator-3")[-3000:]
    assert kills == 3
    assert store.versions.head() >= 50
    assert_exactly_once_and_replayable(store)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test alone, with AOF persistence, that the test may stop and start."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    port = _free_port()
    command = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(tmp_path),
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--save",
        "",
        "--daemonize",
        "no",
    ]

    def start() -> subprocess.Popen:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: _answers(port), 20, "redis-server did not start")
        return server

    state = {"server": start(), "start": start, "port": port}
    yield state
    state["server"].terminate()
    state["server"].wait(timeout=20)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def test_redis_restart_mid_run(processes, job, own_redis):
    redis_url = f"redis://127.0.0.1:{own_redis['port']}/0"
    store = ModelStore(connect_redis(redis_url), job)
    coordinator = processes.start(
        "coordinator", "coordinator", *flags(job, redis_url), *TRAINING, "--concurrency", "2", "--max-versions", "25"
    )
    for index in range(2):
        processes.start(
            f"worker-{index}", "worker", *flags(job, redis_url), "--worker-id", f"w{index}", "--partition", str(index)
        )
    wait_until(lambda: (store.versions.head() or 0) >= 5, 90, "no progress before the restart")
    own_redis["server"].send_signal(signal.SIGTERM)  # with AOF, a clean shutdown keeps every write
    own_redis["server"].wait(timeout=20)
    # Down until a service has lost its connection over it (they use Redis all the time).
    wait_until(
        lambda: (
            "connection_lost" in processes.log("coordinator") + processes.log("worker-0") + processes.log("worker-1")
        ),
        60,
        "no service noticed that Redis was down",
    )
    own_redis["server"] = own_redis["start"]()
    assert coordinator.wait(timeout=180) == 0, processes.log("coordinator")[-3000:]
    assert store.status.load()["reason"] == "max_versions"
    assert "connection_lost" in processes.log("coordinator") + processes.log("worker-0") + processes.log("worker-1")
    assert_exactly_once_and_replayable(store)


def _management(path: str, method: str = "GET"):
    from pika import URLParameters

    params = URLParameters(AMQP_URL)
    token = b64encode(f"{params.credentials.username}:{params.credentials.password}".encode()).decode()
    request = urllib.request.Request(
        f"http://{params.host}:15672{path}", method=method, headers={"Authorization": f"Basic {token}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        body = response.read()
    return json.loads(body) if body else None


def close_job_connections(job: str) -> int:
    """Force-close (as `rabbitmqctl close_connection` does) every connection of this job."""
    closed = 0
    for connection in _management("/api/connections"):
        if job in (connection.get("client_properties") or {}).get("connection_name", ""):
            try:
                _management("/api/connections/" + urllib.parse.quote(connection["name"], safe=""), method="DELETE")
            except urllib.error.HTTPError as error:
                if error.code != 404:  # 404: that connection was already gone (listed a moment ago)
                    raise
                continue
            closed += 1
    return closed


def test_rabbitmq_connections_dropped_mid_run(processes, job, store):
    try:
        _management("/api/overview")
    except OSError:
        pytest.skip("the RabbitMQ management API is not enabled (deploy/setup.sh enables it)")
    coordinator = processes.start(
        "coordinator", "coordinator", *flags(job), *TRAINING, "--concurrency", "2", "--max-versions", "25"
    )
    for index in range(2):
        processes.start(f"worker-{index}", "worker", *flags(job), "--worker-id", f"w{index}", "--partition", str(index))
    for threshold in (5, 12):
        wait_until(lambda: (store.versions.head() or 0) >= threshold, 90, "no progress")  # noqa: B023 (called at once)
        # The management API lists a connection a moment after it opens: keep closing
        # until the coordinator's and both workers' connections have all been hit.
        closed = [0]

        def close_some() -> bool:  # called by wait_until below, within this iteration
            closed[0] += close_job_connections(job)  # noqa: B023
            return closed[0] >= 3  # noqa: B023

        wait_until(close_some, 20, "found fewer than 3 connections of the job")
    assert coordinator.wait(timeout=180) == 0, processes.log("coordinator")[-3000:]
    logs = processes.log("coordinator") + processes.log("worker-0") + processes.log("worker-1")
    assert logs.count("event=connection_lost") >= 3
    assert store.status.load()["reason"] == "max_versions"
    assert_exactly_once_and_replayable(store)


def test_sigterm_stops_the_coordinator_cleanly_and_a_restart_continues(processes, job, store):
    coordinator_flags = ["coordinator", *flags(job), *TRAINING, "--concurrency", "2"]
    # The first coordinator has no version limit, so on a fast machine it cannot finish before the
    # signal arrives; the second runs on to a limit beyond wherever the first stopped.
    first = processes.start("coordinator-1", *coordinator_flags)
    for index in range(2):
        processes.start(f"worker-{index}", "worker", *flags(job), "--worker-id", f"w{index}", "--partition", str(index))
    wait_until(lambda: (store.versions.head() or 0) >= 5, 90, "no progress")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    assert store.status.load()["status"] == "stopped"
    stopped_at = store.versions.head()
    second = processes.start("coordinator-2", *coordinator_flags, "--max-versions", str(stopped_at + 15))
    assert second.wait(timeout=120) == 0, processes.log("coordinator-2")[-3000:]
    assert f"event=resumed job={job} head={stopped_at}" in processes.log("coordinator-2")
    assert store.status.load()["reason"] == "max_versions"
    assert_exactly_once_and_replayable(store)


def test_services_started_while_redis_is_down_wait_for_it(processes, job, own_redis):
    own_redis["server"].terminate()
    own_redis["server"].wait(timeout=20)
    redis_url = f"redis://127.0.0.1:{own_redis['port']}/0"
    coordinator = processes.start(
        "coordinator", "coordinator", *flags(job, redis_url), *TRAINING, "--concurrency", "2", "--max-versions", "3"
    )
    processes.start("worker-0", "worker", *flags(job, redis_url), "--worker-id", "w0")
    # Redis comes up only once the coordinator has found it down and is backing off.
    processes.wait_for_log("coordinator", "event=redis_connect_retry", timeout=180)
    own_redis["server"] = own_redis["start"]()
    assert coordinator.wait(timeout=180) == 0, processes.log("coordinator")[-3000:]
    assert ModelStore(connect_redis(redis_url), job).status.load()["reason"] == "max_versions"
    assert "event=worker_ready" in processes.wait_for_log("worker-0", "event=worker_ready", timeout=60)
