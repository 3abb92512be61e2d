"""What every benchmark needs to run fedq processes: start, watch, stop and clean up after them.

- ``fedq_command``, ``start``: a ``python -m fedq.common.cli ...`` subprocess from the repository
  root, its output in a log; ``stop_all`` stops every process ``start`` started.
- ``launch_workers``, ``wait_ready``: ``fedq worker`` processes (forked from a warmed-up zygote,
  spawned, or cold), and waiting until each has logged ``event=worker_ready``.
- ``wait_exit``: poll a process until it exits, sampling something meanwhile, with a deadline.
- ``cpu_seconds``, ``alive``, ``child_pids``, ``find_pids``, ``machine_busy``,
  ``wait_for_quiet_machine``: CPU time and state from /proc.
- ``cleanup``: delete a job's Redis keys, queues and exchanges.

``python -m bench.harness _zygote SPEC`` (from the repository root) is the zygote of ``launch_workers``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedq.common.store import ModelStore
from fedq.coordinator.ops.status import remove_job

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# -- starting and stopping processes ------------------------------------------

PROCESSES: list[subprocess.Popen] = []
FORKED: list[int] = []  # worker pids forked by a zygote we started (see launch_workers)


def fedq_command(*args: str, module: str = "fedq.common.cli") -> list[str]:
    """``python -m fedq.common.cli ARGS`` with this interpreter (``module``: another entry point)."""
    return [sys.executable, "-m", module, *args]


# The MLP task plugin of the throughput and scale benchmarks, which a coordinator imports from
# the repository root (``start`` runs every process there).
MLP_TASK = "bench.models:MLPTask"


def mlp_coordinator_command(
    job: str,
    sizes: list[int],
    algorithm: str,
    concurrency: int,
    max_seconds: float,
    amqp_url: str,
    redis_url: str,
    *flags: str,
    log_level: str = "INFO",
) -> list[str]:
    """``fedq coordinator`` training ``bench.models:MLPTask`` of ``sizes`` with no evaluation
    (``--eval-every 0``), ending after ``max_seconds``; ``flags`` are added as they are."""
    return fedq_command(
        "coordinator",
        "--job",
        job,
        "--task",
        MLP_TASK,
        "--task-params",
        json.dumps({"sizes": list(sizes)}),
        "--algorithm",
        algorithm,
        "--concurrency",
        str(concurrency),
        "--eval-every",
        "0",
        "--max-seconds",
        str(max_seconds),
        "--log-level",
        log_level,
        "--amqp-url",
        amqp_url,
        "--redis-url",
        redis_url,
        *flags,
    )


def start(args: list[str], log_path: Path, **popen: Any) -> subprocess.Popen:
    """Start ``args`` in the repository root, stdout and stderr to ``log_path``; ``stop_all`` stops it."""
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(args, stdout=popen.pop("stdout", log_file), stderr=log_file, cwd=ROOT, **popen)
    PROCESSES.append(process)
    return process


def _signal_all(signum: int) -> None:
    """Send ``signum`` to every started process and forked worker that still runs."""
    targets = [process.pid for process in PROCESSES if process.poll() is None]
    targets += [pid for pid in FORKED if alive(pid)]
    for pid in targets:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def stop_all(grace: float = 15.0) -> None:
    """SIGTERM every process we started that still runs, then SIGKILL what is left after ``grace``.

    Forked workers get SIGTERM from their zygote and, as a fallback, by pid.
    """
    _signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and (any(p.poll() is None for p in PROCESSES) or any(map(alive, FORKED))):
        time.sleep(0.2)
    _signal_all(signal.SIGKILL)
    for process in PROCESSES:
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    PROCESSES.clear()
    FORKED.clear()


def wait_exit(
    process: subprocess.Popen, *, timeout: float, interval: float, sample: Callable[[], None], timeout_message: str
) -> int:
    """Call ``sample`` every ``interval`` seconds until ``process`` exits; return its exit code.

    Raises RuntimeError(``timeout_message``) if it still runs ``timeout`` seconds from now (the caller
    stops it, e.g. with ``stop_all``).
    """
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if time.monotonic() > deadline:
            raise RuntimeError(timeout_message)
        sample()
        time.sleep(interval)
    return process.returncode


# -- worker processes -------------------------------------------------------


def warm_up_torch() -> None:
    """torch's first forward/backward pass in a process costs ~1.3 s of CPU (lazy initialisation)."""
    import torch

    torch.set_num_threads(1)  # as the worker does; also: no OpenMP pool exists when the zygote forks
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    layer(torch.zeros(1, 2)).sum().backward()
    optimizer.step()


def zygote(spec_path: str) -> int:
    """``--launch fork``: import and warm up once, then fork one ``fedq worker`` per entry of the spec.

    Each child redirects stdout/stderr to its log and runs ``fedq.common.cli.main(["worker", ...])``,
    the function behind ``python -m fedq.common.cli worker``. The zygote prints the children's pids
    as one JSON line, forwards SIGTERM to them and exits when they all have.
    """
    spec = json.loads(Path(spec_path).read_text())
    import importlib

    for module in ["fedq.common.cli", "fedq.common.tasks", "fedq.worker.cli", "fedq.worker.service", *spec["preload"]]:
        importlib.import_module(module)
    warm_up_torch()
    from fedq.common.cli import main as fedq_main

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the workers themselves
    children: list[int] = []
    for worker in spec["workers"]:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                fd = os.open(worker["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.close(fd)
                code = fedq_main(worker["argv"])
            except SystemExit as error:
                code = error.code if isinstance(error.code, int) else 1
            except BaseException:  # noqa: BLE001 - the child must never return into the zygote's loop
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code or 0)
        children.append(pid)
    print(json.dumps(children), flush=True)

    def forward(_signum, _frame):
        for child in children:
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    remaining = set(children)
    while remaining:
        try:
            pid, _status = os.wait()
        except ChildProcessError:
            break
        remaining.discard(pid)
    return 0


def launch_workers(
    mode: str, preload: tuple[str, ...], argvs: list[list[str]], logs: list[Path], log_dir: Path
) -> list[int]:
    """Start one worker process per argv (``fedq worker`` arguments); return their pids.

    fork:  one zygote imports torch and the task's modules, warms torch up, and forks the workers
    spawn: one ``python -c "<imports>; <warm-up>; fedq.common.cli.main()" worker ...`` process per worker
    cold:  ``python -m fedq.common.cli worker ...`` per worker, exactly like ``fedq demo``
    """
    if mode == "fork":
        spec_path = log_dir / "zygote.json"
        spec_path.write_text(
            json.dumps(
                {
                    "preload": list(preload),
                    "workers": [{"argv": argv, "log": str(log)} for argv, log in zip(argvs, logs)],
                }
            )
        )
        process = start(
            fedq_command("_zygote", str(spec_path), module="bench.harness"),
            log_dir / "zygote.log",
            stdout=subprocess.PIPE,
            text=True,
        )
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker zygote exited early; see {log_dir / 'zygote.log'}")
        pids = json.loads(line)
        FORKED.extend(pids)
        return pids
    pids = []
    for argv, log in zip(argvs, logs):
        if mode == "cold":
            command = fedq_command(*argv)
        else:
            code = (
                f"import sys, {', '.join(('fedq.common.tasks', *preload))}; sys.path.insert(0, {str(ROOT)!r}); "
                "from bench.harness import warm_up_torch; warm_up_torch(); "
                "from fedq.common.cli import main; sys.exit(main())"
            )
            command = [sys.executable, "-c", code, *argv]
        pids.append(start(command, log).pid)
    return pids


def wait_ready(logs: list[Path], pids: list[int], timeout: float) -> None:
    """Wait until every worker has logged ``event=worker_ready``; fail if one exits or time runs out."""
    deadline = time.monotonic() + timeout
    pending = set(range(len(logs)))
    while pending:
        for index in list(pending):
            if not alive(pids[index]):
                raise RuntimeError(f"worker {index} exited early; see {logs[index]}")
            # a forked worker may not have opened its log yet
            if logs[index].exists() and "event=worker_ready" in logs[index].read_text(errors="replace"):
                pending.discard(index)
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"workers {sorted(pending)} not ready after {timeout:.0f} s")
        time.sleep(0.25)


# -- /proc: process state and CPU time ----------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, from the state on (None once it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] != "Z"


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of a live process, from /proc (None once it is gone)."""
    fields = _stat_fields(pid)
    if not fields or len(fields) < 13:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def child_pids(pid: int) -> list[int]:
    """The children of ``pid``'s main thread (empty once it is gone)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def find_pids(comm: str) -> list[int]:
    """Pids of the processes whose command name is ``comm`` (e.g. ``beam.smp``)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == comm:
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores together since boot, from /proc/stat.

    Busy is everything but idle and iowait. Guest time is already part of user time, so it is not
    counted again.
    """
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / CLOCK_TICKS, (busy + idle + iowait) / CLOCK_TICKS


def wait_for_quiet_machine(limit_seconds: float, threshold: float = 0.3) -> float:
    """Wait (up to ``limit_seconds``) until the machine is less than ``threshold`` cores busy; returns the load."""
    deadline = time.monotonic() + limit_seconds
    while True:
        before = machine_busy()[0]
        time.sleep(1.0)
        busy = machine_busy()[0] - before
        if busy < threshold or time.monotonic() > deadline:
            return busy


# -- jobs --------------------------------------------------------------------


def cleanup(job: str, amqp_url: str, redis_url: str) -> None:
    """Delete the job: its archive, Redis keys, RabbitMQ queues and exchanges."""
    remove_job(amqp_url, ModelStore.open(redis_url, job), archive=True)


if __name__ == "__main__":
    if sys.argv[1:2] != ["_zygote"] or len(sys.argv) != 3:
        sys.exit("usage: python -m bench.harness _zygote SPEC  (started by launch_workers)")
    sys.exit(zygote(sys.argv[2]))
