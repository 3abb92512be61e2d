"""Run a piece of work on a RabbitMQ connection, reconnecting when the connection is lost.

pika does not reconnect by itself. A session function gets a fresh connection,
declares what it needs and works until it returns (done) or the connection
fails; then we back off, reconnect and call it again. Delivery tags of the old
channel are meaningless afterwards: unacked messages come back from the broker.

The first connection is not retried beyond ``connect``'s own bounded attempts:
a wrong URL or a server that is down ends in one clear error instead of a loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pika
import pika.exceptions

from fedq.broker.connection import HEARTBEAT_SECONDS, BrokerError, CredentialsRefused, connect
from fedq.common.obs.logs import kv

log = logging.getLogger("fedq.broker")

RECONNECT_BACKOFF_SECONDS = (1, 2, 4, 8, 15)
HEALTHY_SESSION_SECONDS = 60.0
# Connection loss (network, broker restart, `rabbitmqctl close_connection`) and a
# channel the broker closed (e.g. consumer_timeout) are worth a new connection.
CONNECTION_LOST = (pika.exceptions.AMQPConnectionError, pika.exceptions.ChannelClosedByBroker)


def run_with_reconnect(
    amqp_url: str,
    session: Callable[[pika.BlockingConnection], None],
    *,
    name: str,
    should_stop: Callable[[], bool] = lambda: False,
    on_connection_lost: Callable[[], None] = lambda: None,
    also_transient: tuple[type[BaseException], ...] = (),
    heartbeat: int = HEARTBEAT_SECONDS,
) -> None:
    """Call ``session(connection)`` until it returns normally or ``should_stop()``.

    ``also_transient`` adds other errors (e.g. Redis connection errors) that
    mean "wait and start the session again".
    """
    connected_once = False
    failures = 0
    while not should_stop():
        try:
            connection = connect(amqp_url, name=name, heartbeat=heartbeat)
        except BrokerError as error:
            if not connected_once or isinstance(error, CredentialsRefused):
                raise
            backoff = RECONNECT_BACKOFF_SECONDS[-1]
            log.warning(kv("reconnect_failed", name=name, error=str(error), retry_in_s=backoff))
            time.sleep(backoff)
            continue
        connected_once = True
        session_started = time.monotonic()
        try:
            session(connection)
            return
        except CONNECTION_LOST + also_transient as error:
            if should_stop():
                return
            if time.monotonic() - session_started > HEALTHY_SESSION_SECONDS:
                failures = 0  # a loss after a long healthy session is a fresh incident
            backoff = RECONNECT_BACKOFF_SECONDS[min(failures, len(RECONNECT_BACKOFF_SECONDS) - 1)]
            failures += 1
            # (type and message: redis-py 8's repr of its errors drops the message)
            detail = f"{type(error).__name__}: {error}"
            log.warning(kv("connection_lost", name=name, error=detail, retry_in_s=backoff))
            on_connection_lost()
            time.sleep(backoff)
        finally:
            if connection.is_open:
                try:
                    connection.close()
                except pika.exceptions.AMQPError:
                    pass
