"""Redis URLs beyond one server: a Redis Cluster's seeds, Sentinel's sentinels and master name."""

from __future__ import annotations

import pytest

from fedq.common.store import StoreError, connect_redis
from fedq.common.store.cluster import ServersURL


def test_a_cluster_url_names_its_seed_nodes_and_login():
    servers = ServersURL.parse("redis+cluster://fedq:p%40ss@redis-1:7000,redis-2:7001,[::1]:7002/")
    assert servers is not None
    assert (servers.kind, servers.tls, servers.username, servers.password) == ("cluster", False, "fedq", "p@ss")
    assert servers.nodes == (("redis-1", 7000), ("redis-2", 7001), ("::1", 7002))
    assert ServersURL.parse("rediss+cluster://redis-1:7000").tls


def test_a_sentinel_url_names_the_sentinels_the_master_and_a_database():
    servers = ServersURL.parse("redis+sentinel://s-1:26379,s-2:26379/mymaster/2")
    assert servers is not None
    assert (servers.kind, servers.master_name, servers.db, servers.username) == ("sentinel", "mymaster", 2, None)
    assert servers.nodes == (("s-1", 26379), ("s-2", 26379))


def test_a_url_of_one_server_is_left_to_redis_py():
    assert ServersURL.parse("redis://localhost:6379/0") is None
    assert ServersURL.parse("rediss://user:pw@redis:6380/1") is None


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+cluster:///", "names no node"),
        ("redis+cluster://redis-1/", "has no port"),
        ("redis+cluster://redis-1:seven/", "is not a number"),
        ("redis+cluster://redis-1:7000/3", "has only database 0"),
        ("redis+sentinel://s-1:26379/", "name the master the sentinels monitor"),
        ("redis+sentinel://s-1:26379/mymaster/x", "the database is not a number"),
    ],
)
def test_a_bad_url_is_one_sentence(url, problem):
    with pytest.raises(StoreError, match=f"Redis URL .* is not valid: .*{problem}"):
        connect_redis(url, job="j", attempts=1)
