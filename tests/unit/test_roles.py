"""The grants of coordinator/ops/roles.py, checked as RabbitMQ and Redis will read them: regular
expressions over resource names, glob patterns over keys."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

import pytest

from fedq.common.store.keys import JobKeys
from fedq.coordinator.ops.admin import site_url
from fedq.coordinator.ops.roles import RoleError, grant

KEYS = JobKeys("j1")


def matches(pattern: str, name: str) -> bool:
    return re.search(pattern, name) is not None  # RabbitMQ applies permission patterns with search


def key_patterns(rules: tuple[str, ...], access: str) -> list[str]:
    """The key patterns granting ``access`` ('R' or 'W'): ``~`` grants both."""
    found = []
    for rule in rules:
        if rule.startswith("~"):
            found.append(rule[1:])
        elif rule.startswith("%") and "~" in rule and access in rule[1 : rule.index("~")]:
            found.append(rule[rule.index("~") + 1 :])
    return found


def allowed(rules, access: str, key: str) -> bool:
    return any(fnmatchcase(key, pattern) for pattern in key_patterns(rules, access))


def test_a_worker_reads_its_tasks_writes_updates_and_configures_nothing():
    rabbit = grant("worker", "j1", "alice").rabbitmq
    assert not matches(rabbit.configure, "fedq.j1.tasks") and not matches(rabbit.configure, "alice-queue")
    assert matches(rabbit.write, "fedq.j1.updates") and matches(rabbit.write, "fedq.j1.dead")
    for name in ("fedq.j1.tasks", "fedq.j10.updates", "fedq.j1.updatesX", "xfedq.j1.updates", "fedq.j1Xupdates"):
        assert not matches(rabbit.write, name), name
    assert matches(rabbit.read, "fedq.j1.tasks")
    for name in ("fedq.j1.updates", "fedq.j1.dead", "fedq.j2.tasks", "fedq.j1.tasks2"):
        assert not matches(rabbit.read, name), name


def test_a_worker_reads_the_model_and_writes_only_its_own_keys():
    rules = grant("worker", "j1", "alice").redis_rules
    for key in (KEYS.spec, KEYS.model(3), KEYS.meta(3)):
        assert allowed(rules, "R", key) and not allowed(rules, "W", key), key
    for key in (KEYS.update("alice", "t1"), KEYS.worker("alice")):
        assert allowed(rules, "W", key), key
    for key in (
        KEYS.signing_key,
        KEYS.head,
        KEYS.history,
        KEYS.applied,
        KEYS.inflight,
        KEYS.identities,
        KEYS.update("bob", "t1"),
        KEYS.worker("bob"),
        JobKeys("j2").model(3),
        "fedq:{j1}:model",
    ):
        assert not allowed(rules, "R", key) and not allowed(rules, "W", key), key
    assert "-@all" in rules and "+flushall" not in rules and "+@connection" not in rules


def test_the_monitor_reads_everything_but_the_signing_key_and_writes_nothing():
    grant_ = grant("monitor", "j1", "ops")
    assert grant_.rabbitmq.write == grant_.rabbitmq.configure == grant_.rabbitmq.read == "^$"
    for key in (KEYS.head, KEYS.history, KEYS.model(1), KEYS.update("w", "t"), KEYS.state, KEYS.counters):
        assert allowed(grant_.redis_rules, "R", key), key
    assert not allowed(grant_.redis_rules, "R", KEYS.signing_key)
    assert key_patterns(grant_.redis_rules, "W") == []


def test_the_coordinator_owns_its_job_only():
    grant_ = grant("coordinator", "j1", "coordinator")
    for name in ("fedq.j1.tasks", "fedq.j1.updates", "fedq.j1.dead"):
        assert matches(grant_.rabbitmq.configure, name) and matches(grant_.rabbitmq.read, name)
    assert not matches(grant_.rabbitmq.configure, "fedq.j2.tasks")
    assert allowed(grant_.redis_rules, "W", KEYS.head) and allowed(grant_.redis_rules, "R", KEYS.signing_key)
    assert not allowed(grant_.redis_rules, "R", JobKeys("j2").head)


@pytest.mark.parametrize("name", ["a*", "a?b", "a[b]", "a:b", "-lead", "", "x" * 65, "a b", "ä"])
def test_names_that_could_widen_a_pattern_are_refused(name):
    with pytest.raises(RoleError):
        grant("worker", "j1", name)


def test_unknown_role_is_refused_with_the_choices():
    with pytest.raises(RoleError, match="worker, coordinator, monitor"):
        grant("admin", "j1", "x")


def test_a_site_url_carries_the_new_credentials_only():
    assert (
        site_url("amqps://admin:secret@rabbit:5671/%2F", "fedq.j1.alice", "p/w")
        == "amqps://fedq.j1.alice:p%2Fw@rabbit:5671/%2F"
    )
    assert site_url("rediss://redis:6380/0", "u", "p") == "rediss://u:p@redis:6380/0"


def test_replicas_of_a_site_write_their_own_keys_and_no_other_sites():
    rules = grant("worker", "j1", "alice").redis_rules
    for key in (KEYS.update("alice.pod-1", "t1"), KEYS.worker("alice.pod-1")):
        assert allowed(rules, "W", key), key
    for key in (KEYS.update("alicex", "t1"), KEYS.worker("alicex"), KEYS.update("alice-2.pod", "t1")):
        assert not allowed(rules, "W", key), key
