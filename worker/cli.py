"""``fedq worker``: run one worker of a job."""

from __future__ import annotations

import argparse

from fedq.common.obs.logs import setup_logging
from fedq.common.obs.metrics import serve_metrics
from fedq.common.settings import (
    CONNECTION_OPTIONS,
    SERVICE_OPTIONS,
    Option,
    add_options,
    json_object,
    non_negative_float,
    positive_int,
    resolve,
)

HELP = "Run a worker: take round tasks of a job, train on this worker's data partition, publish updates."


def _optional_int(text):
    return None if str(text).lower() in ("", "none") else int(text)


def _optional_str(text):
    return None if str(text).lower() in ("", "none") else str(text)


def _device(text):
    from fedq.worker.training import training_device

    return str(training_device(str(text)))


def _fingerprint(text):
    from fedq.common.wire.signing import parse_fingerprint

    return None if str(text).lower() in ("", "none") else parse_fingerprint(str(text))


OPTIONS = (
    CONNECTION_OPTIONS
    + [
        Option(
            "task",
            str,
            None,
            "this worker's task plugin: digits, digits28, synthetic, linear or module:object "
            "(default: the job's, if it is built in; a worker never imports code named in Redis)",
        ),
        Option("task_params", json_object, None, "its parameters as a JSON object (default: the job's)"),
        Option(
            "coordinator_key",
            _fingerprint,
            None,
            "fingerprint of the job's coordinator key, as the coordinator "
            "logs it (event=coordinator_key): tasks and the job description must be signed by it",
        ),
        Option(
            "worker_id",
            str,
            "",
            "stable id of this worker; {hostname} is replaced by the host name, e.g. site-a.{hostname} for replicas "
            "of an enrolled site (default: host-pid-random)",
        ),
        Option(
            "partition",
            _optional_int,
            None,
            "data partition of a built-in task this worker trains on (default: "
            "the coordinator leases one that no other live worker holds)",
        ),
        Option(
            "data",
            _optional_str,
            None,
            "this worker's own data: a path or fsspec URL handed to the task plugin's "
            "local_data_at (built-in tasks read an .npz with arrays 'features' and 'targets'); no partition is leased",
        ),
        Option("device", _device, "cpu", "torch device to train on: cpu, cuda, cuda:N or mps"),
        Option("slowdown", non_negative_float, 0.0, "extra seconds per task, to simulate a slow link"),
        Option("step_delay", non_negative_float, 0.0, "extra seconds per training step, to simulate a slow device"),
        Option("max_tasks", _optional_int, None, "exit after this many tasks"),
        Option("drain_seconds", non_negative_float, 60.0, "on SIGTERM, how long the current task may still run"),
        Option("heartbeat", positive_int, 30, "AMQP heartbeat interval in seconds"),
        Option(
            "state_dir",
            _optional_str,
            None,
            "where this worker keeps its error-feedback residual across restarts of the same --worker-id "
            "(default: $XDG_STATE_HOME/fedq or ~/.local/state/fedq)",
        ),
        Option(
            "min_dp_noise",
            non_negative_float,
            0.0,
            "refuse jobs whose tasks ask for less local differential-privacy noise than this multiplier "
            "(0: serve any job)",
        ),
    ]
    + SERVICE_OPTIONS
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, OPTIONS)


def main(args: argparse.Namespace) -> int:
    values = resolve(args, OPTIONS)
    setup_logging(values["log_level"])
    serve_metrics(values["metrics_port"])
    from fedq.worker.service import Worker, WorkerSettings

    worker = Worker(
        WorkerSettings(
            job=values["job"],
            amqp_url=values["amqp_url"],
            redis_url=values["redis_url"],
            worker_id=values["worker_id"],
            partition=values["partition"],
            data=values["data"],
            device=values["device"],
            slowdown_seconds=values["slowdown"],
            step_delay_seconds=values["step_delay"],
            max_tasks=values["max_tasks"],
            drain_seconds=values["drain_seconds"],
            heartbeat_seconds=values["heartbeat"],
            task=values["task"],
            task_params=values["task_params"],
            coordinator_key=values["coordinator_key"],
            state_dir=values["state_dir"],
            min_dp_noise=values["min_dp_noise"],
            redis_wait_replicas=values["redis_wait_replicas"],
        )
    )
    worker.install_signal_handlers()
    return worker.run()
