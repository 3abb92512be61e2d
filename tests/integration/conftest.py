"""Fixtures of the integration tests: a job of the test's own on the real servers, fedq processes, and
the session's private secured servers (``pki``, ``secure_rabbitmq``, ``secure_redis``: see
tests/private_servers.py; a module that imports these names gets servers of its own instead)."""

from __future__ import annotations

import uuid

import pytest

from tests.private_servers import session_pki, session_secure_rabbitmq, session_secure_redis  # noqa: F401
from tests.support import REDIS_URL, Processes, cleanup_job


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture
def job(request) -> str:
    """A job name of this test alone, so tests never see each other's queues or keys."""
    name = "t-" + request.node.name.replace("[", "-").replace("]", "")[:32] + "-" + uuid.uuid4().hex[:6]
    yield name
    cleanup_job(name)


@pytest.fixture
def store(job):
    from fedq.common.store import ModelStore, connect_redis

    return ModelStore(connect_redis(REDIS_URL), job)


@pytest.fixture
def processes(tmp_path, job) -> Processes:
    # Depends on `job` so that it is torn down first: the processes are killed before the job's
    # keys and queues are removed, and none can write them again afterwards.
    group = Processes(tmp_path)
    yield group
    group.stop_all()
