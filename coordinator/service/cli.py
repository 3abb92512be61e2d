"""``fedq coordinator``: run the coordinator of one job."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from fedq.common.obs.logs import kv, setup_logging
from fedq.common.obs.metrics import serve_metrics
from fedq.common.privacy import MODES, ON_BUDGET
from fedq.common.settings import (
    CONNECTION_OPTIONS,
    SERVICE_OPTIONS,
    Option,
    SettingsError,
    add_options,
    json_object,
    non_negative_float,
    non_negative_int,
    parse_bool,
    positive_float,
    positive_int,
    resolve,
)
from fedq.coordinator.algorithms.registry import (
    ALGORITHMS,
    ROBUST_ESTIMATORS,
    SERVER_OPTIMIZERS,
    STALENESS_BOUNDS,
    STALENESS_FUNCTIONS,
)
from fedq.coordinator.service.settings import DOWNLINK_MODES

HELP = "Run the coordinator of a job: dispatch round tasks, aggregate updates, commit versions to Redis."


def _optional(parse):
    return lambda text: None if str(text).lower() in ("", "none") else parse(text)


def _compression(text):
    from fedq.common.wire.compression import Compression

    return Compression.parse(str(text)).spec


def _seconds_or_auto(text):
    return "auto" if str(text).lower() == "auto" else non_negative_float(text)


OPTIONS = (
    CONNECTION_OPTIONS
    + [
        Option("task", str, "digits", "task plugin: digits, digits28, synthetic, linear or module:object"),
        Option("task_params", json_object, {}, "task plugin parameters as a JSON object"),
        Option("algorithm", str, "fedasync", "aggregation", choices=tuple(ALGORITHMS)),
        Option("concurrency", positive_int, 4, "tasks kept in flight (sync FedAvg: clients per round)"),
        Option("buffer_size", positive_int, 3, "FedBuff: updates per server step (K)"),
        Option(
            "staleness",
            str,
            "polynomial:a=0.5",
            f"staleness function NAME[:param=value,...][@average], NAME one of {', '.join(STALENESS_FUNCTIONS)}; "
            "e.g. polynomial:a=0.5 or hinge:a=10,b=4",
        ),
        Option("mixing_rate", positive_float, 0.6, "FedAsync: mixing rate alpha"),
        Option(
            "staleness_bound",
            str,
            "adaptive",
            "adaptive: judge and weigh each update by the staleness its worker's "
            "measured speed predicts, so slow workers count as much as their data; fixed: reject updates staler than "
            "--max-staleness and weigh the rest by --staleness",
            choices=STALENESS_BOUNDS,
        ),
        Option(
            "max_staleness",
            _optional(non_negative_int),
            None,
            "reject updates staler than this many versions (default: 20 with the fixed bound, none when adaptive)",
        ),
        Option(
            "staleness_tolerance",
            positive_float,
            8.0,
            "adaptive: reject an update more than this many times staler than its worker's speed predicts",
        ),
        Option(
            "damp_above",
            positive_float,
            2.0,
            "adaptive: shrink the server step when an update in it is more than "
            "this many times staler than expected (FADAS-style damping)",
        ),
        Option("max_update_weight", positive_float, 1.0, "adaptive: the most one update may weigh in a server step"),
        Option(
            "max_age_seconds",
            _optional(positive_float),
            None,
            "reject updates that arrive more than this many "
            "seconds after their task was issued (default: only the task lease's bound)",
        ),
        Option("example_weighted", parse_bool, False, "FedBuff: weight updates by their example counts"),
        Option(
            "require_identity",
            parse_bool,
            False,
            "accept updates only from workers enrolled with `fedq admin "
            "enroll` (automatic once the job has one), each from its own RabbitMQ user",
        ),
        Option("clip_norm", non_negative_float, 0.0, "FedBuff: clip each update to this L2 norm (0: off)"),
        Option(
            "robust",
            str,
            "mean",
            "FedBuff: combine the buffer by its mean, coordinate-wise median or trimmed mean",
            choices=ROBUST_ESTIMATORS,
        ),
        Option(
            "norm_outlier_factor",
            non_negative_float,
            10.0,
            "refuse an update whose L2 norm exceeds this many times the median of accepted ones "
            "(and of the model's own norm) as norm_outlier (0: off)",
        ),
        Option("trim_fraction", non_negative_float, 0.1, "FedBuff trimmed_mean: fraction dropped at each end"),
        Option("server_optimizer", str, "sgd", "server optimizer", choices=SERVER_OPTIMIZERS),
        Option("server_lr", positive_float, 1.0, "server learning rate"),
        Option("local_epochs", positive_int, 1, "local epochs per task (with --task-seconds: at most this many)"),
        Option(
            "task_seconds",
            _seconds_or_auto,
            0.0,
            "device-sized tasks: each worker trains as many steps as fit in "
            "this many seconds (at most --local-epochs), so slow devices return as often as fast ones; auto: what "
            "--local-epochs take the median worker, as measured (0: whole epochs)",
        ),
        Option("batch_size", positive_int, 32, "local minibatch size"),
        Option("learning_rate", positive_float, 0.05, "local learning rate"),
        Option("target", _optional(float), None, "stop once the task's score (accuracy; R^2 for linear) reaches this"),
        Option("max_versions", _optional(positive_int), None, "stop after this many versions"),
        Option("max_seconds", _optional(positive_float), None, "stop after this many seconds"),
        Option("eval_every", non_negative_int, 1, "evaluate every N versions (0: never)"),
        Option(
            "plateau",
            _optional(non_negative_int),
            None,
            "stop when the score has not improved by --plateau-epsilon "
            "in this many evaluations (default: 100 with --target, else never; 0: never)",
        ),
        Option("plateau_epsilon", non_negative_float, 0.001, "the least improvement of the score that counts"),
        Option("seed", int, 0, "seed of the initial model"),
        Option("task_lease_seconds", positive_float, 600.0, "a task not answered within this is replaced"),
        Option(
            "round_seconds",
            _optional(positive_float),
            None,
            "fedavg: close a round this many seconds after it "
            "started if --min-updates came back; the rest of its tasks are withdrawn (default: wait for all)",
        ),
        Option(
            "min_updates",
            _optional(positive_int),
            None,
            "fedavg: the fewest updates a round closed by --round-seconds may have (default: --concurrency)",
        ),
        Option(
            "archive",
            str,
            "",
            "where older history goes: a directory or fsspec URL (s3://bucket/prefix, ...); "
            "'none' keeps everything in Redis (default: ~/.local/share/fedq/archive)",
        ),
        Option(
            "hot_versions",
            non_negative_int,
            0,
            "versions kept whole in Redis; older ones move to the archive (0: max_staleness + 2, or 22)",
        ),
        Option(
            "checkpoint_every",
            non_negative_int,
            50,
            "the archive keeps the weights of every k-th version; replay "
            "recomputes the ones between (0: version 0 only)",
        ),
        Option("archive_seconds", positive_float, 10.0, "how often the coordinator moves history to the archive"),
        Option(
            "redis_budget_mb",
            positive_int,
            2048,
            "the job's Redis memory: warn past 80 %%; past 90 %%, new tasks wait for the archiver to catch up",
        ),
        Option(
            "compression",
            _compression,
            "none",
            "how workers encode their updates: none, fp16, bf16, int8[:block=N], topk[:fraction=F] "
            "(largest magnitudes of the whole update) or prune[:fraction=F] (of each tensor); e.g. topk:fraction=0.01",
        ),
        Option(
            "error_feedback",
            parse_bool,
            True,
            "with lossy --compression: each worker adds what its encoding dropped to its next update",
        ),
        Option(
            "downlink",
            str,
            "auto",
            "store the exact diff between consecutive versions, which workers holding the previous one "
            "read instead of the model: auto (with a sparse --compression: topk or prune), diffs (always) or full",
            choices=DOWNLINK_MODES,
        ),
        Option(
            "dp",
            str,
            "off",
            "differential privacy: off, local (each worker clips and noises its update) or central "
            "(the coordinator clips every update and noises each FedBuff step)",
            choices=MODES,
        ),
        Option("dp_clip", non_negative_float, 0.0, "DP: the L2 norm every update is clipped to (required with --dp)"),
        Option("dp_noise", positive_float, 1.0, "DP: noise standard deviation as a multiple of --dp-clip"),
        Option("dp_delta", positive_float, 1e-5, "DP: the delta epsilon is reported for"),
        Option(
            "dp_epsilon",
            _optional(positive_float),
            None,
            "DP budget: stop (or warn, --dp-on-budget) before epsilon would exceed it (default: no budget)",
        ),
        Option("dp_on_budget", str, "stop", "DP: what a spent budget does", choices=ON_BUDGET),
        Option(
            "dp_population",
            _optional(positive_int),
            None,
            "central DP: how many participants a step's updates come from; epsilon then assumes "
            "they take part as if sampled at random (default: no such assumption, sampling rate 1)",
        ),
        Option("server_beta1", float, 0.9, "server optimizer: first-moment decay (momentum for 'momentum')"),
        Option("server_beta2", float, 0.99, "server optimizer: second-moment decay"),
        Option("server_epsilon", positive_float, 1e-3, "server optimizer: adaptivity epsilon (tau in Reddi et al.)"),
    ]
    + SERVICE_OPTIONS
)


# Settings that only some configurations read: given with another, they would be ignored without
# a word, and the user would believe they had an effect. (setting, what it needs, does it hold?)
ONLY_WITH: list[tuple[str, str, Callable[[dict[str, Any]], bool]]] = [
    *[
        (name, "--algorithm fedbuff", lambda values: values["algorithm"] == "fedbuff")
        for name in ("buffer_size", "example_weighted", "clip_norm", "robust", "trim_fraction")
    ],
    ("trim_fraction", "--robust trimmed_mean", lambda values: values["robust"] == "trimmed_mean"),
    ("mixing_rate", "--algorithm fedasync", lambda values: values["algorithm"] == "fedasync"),
    # (Staleness bounds and the staleness function still judge and weigh fedavg's late updates.)
    *[
        (
            name,
            "an asynchronous --algorithm (fedasync or fedbuff): fedavg weighs a round's updates by their examples",
            lambda values: values["algorithm"] != "fedavg",
        )
        for name in ("damp_above", "max_update_weight")
    ],
    *[
        (name, "--staleness-bound adaptive", lambda values: values["staleness_bound"] == "adaptive")
        for name in ("staleness_tolerance", "damp_above", "max_update_weight")
    ],
    *[
        (name, "--algorithm fedavg", lambda values: values["algorithm"] == "fedavg")
        for name in ("round_seconds", "min_updates")
    ],
    ("min_updates", "--round-seconds", lambda values: values["round_seconds"] is not None),
    ("error_feedback", "a lossy --compression", lambda values: values["compression"] != "none"),
    *[
        (name, "--dp local or central", lambda values: values["dp"] != "off")
        for name in ("dp_clip", "dp_noise", "dp_delta", "dp_epsilon", "dp_on_budget")
    ],
    ("dp_population", "--dp central", lambda values: values["dp"] == "central"),
    ("dp_on_budget", "--dp-epsilon", lambda values: values["dp_epsilon"] is not None),
    ("server_beta2", "--server-optimizer adam or yogi", lambda values: values["server_optimizer"] in ("adam", "yogi")),
    (
        "server_epsilon",
        "--server-optimizer adam, adagrad or yogi",
        lambda values: values["server_optimizer"] in ("adam", "adagrad", "yogi"),
    ),
    (
        "server_beta1",
        "--server-optimizer momentum, adam, adagrad or yogi",
        lambda values: values["server_optimizer"] != "sgd",
    ),
]


def check_combinations(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Refuse, in one sentence, a flag the rest of the configuration ignores. The environment and
    a job file are shared by a deployment's runs (compose sets FEDQ_BUFFER_SIZE whatever the
    algorithm): a setting from there that has no effect is named in a warning instead."""
    for name, needs, holds in ONLY_WITH:
        if name in sources and not holds(values):
            if sources[name].startswith("--"):
                raise SettingsError(f"{sources[name]} has no effect without {needs}; leave it out")
            print(f"fedq: warning: {sources[name]} has no effect without {needs}, and is ignored", file=sys.stderr)
    target = values.get("target")
    if target is not None and not -1 <= target <= 1:
        raise SettingsError(
            f"{sources.get('target', '--target')}={target} is not a score the tasks reach: "
            f"accuracy and R^2 are fractions (0.9, not 90)"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, OPTIONS)


def main(args: argparse.Namespace) -> int:
    sources: dict[str, str] = {}
    values = resolve(args, OPTIONS, sources=sources)
    check_combinations(values, sources)
    setup_logging(values.pop("log_level"))
    serve_metrics(values.pop("metrics_port"))
    values.pop("management_url")  # the coordinator never calls the management API
    from fedq.broker.connection import connect
    from fedq.coordinator.service.loop import Coordinator
    from fedq.coordinator.service.settings import CoordinatorSettings

    try:
        settings = CoordinatorSettings(**values)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    # Before anything is written into Redis: a coordinator that cannot reach RabbitMQ leaves no job behind.
    connect(settings.amqp_url, name=f"fedq-coordinator-{settings.job}-check").close()
    try:
        coordinator = Coordinator(settings)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: coordinator.request_stop())
    summary = coordinator.run()
    logging.getLogger("fedq.coordinator").info(
        kv("summary", head=summary["head"], reason=summary["reason"], seconds=summary["seconds"], **summary["metrics"])
    )
    return 0
