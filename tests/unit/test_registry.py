"""One list of names: the registry builds every algorithm and supplies the CLI's choices."""

from __future__ import annotations

import pytest

from fedq.coordinator.algorithms.aggregation import FedAsync, FedBuff
from fedq.coordinator.algorithms.registry import ALGORITHMS, ROBUST_ESTIMATORS, SERVER_OPTIMIZERS, STALENESS_FUNCTIONS
from fedq.coordinator.algorithms.step import build_aggregator
from fedq.coordinator.ops import demo
from fedq.coordinator.service import cli
from fedq.coordinator.service.settings import CoordinatorSettings


def choices(options, name):
    return next(option.choices for option in options if option.name == name)


def test_the_cli_offers_exactly_the_registered_names():
    assert choices(cli.OPTIONS, "algorithm") == tuple(ALGORITHMS) == choices(demo.OPTIONS, "algorithm")
    assert choices(cli.OPTIONS, "server_optimizer") == SERVER_OPTIMIZERS
    assert choices(cli.OPTIONS, "robust") == ROBUST_ESTIMATORS
    staleness_help = next(option.help for option in cli.OPTIONS if option.name == "staleness")
    assert all(name in staleness_help for name in STALENESS_FUNCTIONS)


@pytest.mark.parametrize(
    "name, kind, buffer_size, synchronous",
    [("fedasync", FedAsync, 1, False), ("fedbuff", FedBuff, 3, False), ("fedavg", FedBuff, 5, True)],
)
def test_every_registered_algorithm_builds_from_a_recorded_config(name, kind, buffer_size, synchronous):
    config = CoordinatorSettings(
        job="j", amqp_url="", redis_url="", algorithm=name, buffer_size=3, concurrency=5
    ).aggregation_config()
    aggregator = build_aggregator(config)
    assert type(aggregator) is kind and aggregator.buffer_size == buffer_size
    assert ALGORITHMS[name].synchronous is synchronous


def test_a_recorded_config_with_an_unknown_algorithm_is_refused():
    config = CoordinatorSettings(job="j", amqp_url="", redis_url="").aggregation_config()
    with pytest.raises(ValueError, match="unknown algorithm 'fedprox'"):
        build_aggregator(dict(config, algorithm="fedprox"))
