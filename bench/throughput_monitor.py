"""CPU use and Redis memory of the parties of a ``throughput.py`` run, sampled during the run."""

from __future__ import annotations

import time

from bench.harness import child_pids, cpu_seconds, find_pids, machine_busy
from fedq.common.store import ModelStore

# A run during which other processes kept more than this share of a core busy is suspect.
BUSY_OTHER = 0.3


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
        self.rabbit_pids = find_pids("beam.smp")
        self.samples: list[tuple[float, int, dict[str, float]]] = []
        self.memory: list[tuple[int, int]] = []  # (head, Redis used_memory)

    def _coordinator(self) -> int | None:
        if self.coordinator_pid is None:  # under py-spy: the coordinator is py-spy's child
            children = child_pids(self.pid)
            self.coordinator_pid = children[0] if children else None
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
        cpu: dict[str, float] = {
            "fake workers": time.process_time(),
            "redis": info["used_cpu_user"] + info["used_cpu_sys"],
        }
        pid = self._coordinator()
        coordinator = cpu_seconds(pid) if pid is not None else None
        if coordinator is None:
            return
        cpu["coordinator"] = coordinator
        rabbit = [cpu_seconds(pid) for pid in self.rabbit_pids]
        if self.rabbit_pids and None not in rabbit:
            cpu["rabbitmq"] = sum(rabbit)
        cpu["machine"] = machine_busy()[0]
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
