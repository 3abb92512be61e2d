"""Prometheus metrics of the coordinator and the workers (conventional names and units).

Every metric carries a ``job`` label so one Prometheus can scrape several
federations. ``serve_metrics(port)`` exposes ``/metrics``; port 0 turns it off.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
STEP_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
TASK_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800)

# -- coordinator ----------------------------------------------------------
UPDATES_APPLIED = Counter("fedq_updates_applied_total", "Updates folded into a committed version", ["job"])
UPDATES_REJECTED = Counter("fedq_updates_rejected_total", "Updates dead-lettered, by reason", ["job", "reason"])
UPDATES_SKIPPED = Counter(
    "fedq_updates_skipped_total", "Updates acked without use (e.g. duplicates)", ["job", "reason"]
)
TASKS_DISPATCHED = Counter("fedq_tasks_dispatched_total", "Round tasks published", ["job"])
VERSIONS_COMMITTED = Counter("fedq_versions_committed_total", "Global versions committed by this process", ["job"])
STALENESS = Histogram("fedq_staleness", "Staleness (versions) of applied updates", ["job"], buckets=STALENESS_BUCKETS)
AGGREGATION_SECONDS = Histogram(
    "fedq_aggregation_seconds", "Aggregation and server-optimizer step time", ["job"], buckets=STEP_SECONDS_BUCKETS
)
COMMIT_SECONDS = Histogram(
    "fedq_commit_seconds", "Time to commit a version to Redis", ["job"], buckets=STEP_SECONDS_BUCKETS
)
HEAD_VERSION = Gauge("fedq_head_version", "Current global model version", ["job"])
BUFFER_FILL = Gauge("fedq_buffer_fill", "Validated updates waiting in the aggregation buffer", ["job"])
TASKS_IN_FLIGHT = Gauge("fedq_tasks_in_flight", "Tasks dispatched and not yet answered", ["job"])
PRIVACY_EPSILON = Gauge(
    "fedq_privacy_epsilon", "Differential privacy spent so far: epsilon for the job's --dp-delta", ["job"]
)
MODEL_SCORE = Gauge("fedq_model_score", "Latest evaluation metric of the global model", ["job", "metric"])
# Each worker's contribution, as the coordinator sees it (one series per worker id).
PER_WORKER_APPLIED = Counter(
    "fedq_contribution_applied_total", "Updates of a worker folded into versions", ["job", "worker"]
)
PER_WORKER_REJECTED = Counter(
    "fedq_contribution_rejected_total", "Updates of a worker dead-lettered, by reason", ["job", "worker", "reason"]
)
PER_WORKER_ROUND_TRIP = Gauge(
    "fedq_contribution_round_trip_seconds",
    "Smoothed seconds from a task's issue to its worker's update",
    ["job", "worker"],
)

# -- worker ---------------------------------------------------------------
WORKER_TASK_SECONDS = Histogram(
    "fedq_worker_task_seconds", "Wall time of one task on a worker", ["job"], buckets=TASK_SECONDS_BUCKETS
)
WORKER_TASKS = Counter("fedq_worker_tasks_total", "Tasks finished by this worker, by outcome", ["job", "outcome"])
WORKER_BYTES_SENT = Counter("fedq_worker_bytes_sent_total", "Bytes of weight deltas sent (inline or blob)", ["job"])
WORKER_BYTES_RECEIVED = Counter(
    "fedq_worker_bytes_received_total",
    "Bytes of model versions read, by how (full: the weights; diffs: the chain from a held version; held: none)",
    ["job", "source"],
)
WORKER_FAILURES = Counter(
    "fedq_worker_failures_total", "Task failures and lost connections on this worker", ["job", "kind"]
)


def serve_metrics(port: int) -> None:
    """Expose /metrics on ``port`` (all interfaces); 0 leaves metrics off."""
    if port:
        start_http_server(port)
