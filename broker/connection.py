"""Opening a pika connection, with a bounded, backing-off retry.

pika has no automatic reconnection. We retry only ``AMQPConnectionError``
(server not up yet, network blip) and a host name that does not resolve yet (a
container or Service about to appear); authentication and access errors are final
because retrying them cannot succeed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time

import pika
import pika.exceptions

from fedq.broker import header_decoding
from fedq.common import tls
from fedq.common.retry import CONNECT_ATTEMPTS, backoff_delays
from fedq.common.settings import amqp_urls, redact_url

log = logging.getLogger("fedq.broker")

# Heartbeats every 30 s: long enough that a loaded 2-core machine doesn't miss
# them, short enough that a dead peer is noticed within a minute.
HEARTBEAT_SECONDS = 30
# A broker under a memory or disk alarm blocks publishers; fail instead of hanging.
BLOCKED_CONNECTION_TIMEOUT_SECONDS = 60


class BrokerError(RuntimeError):
    """RabbitMQ cannot be used; the message is one sentence for the user."""


class CredentialsRefused(BrokerError):
    """The broker refused these credentials: wrong, changed or revoked. Final, even for a
    service that was connected before (``fedq admin revoke`` deletes the user)."""


def parameters(url: str, *, heartbeat: int = HEARTBEAT_SECONDS, name: str = "fedq") -> pika.URLParameters:
    try:
        params = pika.URLParameters(url)
    except Exception as error:  # pika raises a variety of types for a malformed URL
        raise BrokerError(f"RabbitMQ URL {url!r} is not valid: {error}") from None
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = BLOCKED_CONNECTION_TIMEOUT_SECONDS
    params.connection_attempts = 1
    params.socket_timeout = 10
    params.client_properties = {"connection_name": name}
    if params.ssl_options is not None:  # amqps://: verify the broker, present our certificate if we have one
        try:
            params.ssl_options = pika.SSLOptions(tls.configured().context(), server_hostname=params.host)
        except tls.TLSError as error:
            raise BrokerError(str(error)) from None
    return params


def connect(
    url: str, *, name: str = "fedq", heartbeat: int = HEARTBEAT_SECONDS, attempts: int = CONNECT_ATTEMPTS
) -> pika.BlockingConnection:
    """Open a blocking connection, retrying transient failures with exponential backoff.

    ``url`` may list the nodes of a cluster, comma-separated: each attempt tries them in turn, and
    the first that accepts the connection serves it (a quorum queue is reachable from any node).
    """
    # Before any delivery is decoded: a header pika cannot decode must not cost the connection.
    header_decoding.install()
    nodes = [(node, parameters(node, heartbeat=heartbeat, name=name)) for node in amqp_urls(url)]
    delays = backoff_delays(attempts)
    attempt = 1
    while True:
        errors = []
        for node, params in nodes:
            try:
                connection = pika.BlockingConnection(params)
            except pika.exceptions.ProbableAuthenticationError:
                raise CredentialsRefused(f"RabbitMQ at {redact_url(node)} refused the user name or password") from None
            except pika.exceptions.ProbableAccessDeniedError:
                raise CredentialsRefused(f"RabbitMQ at {redact_url(node)} denied access to the virtual host") from None
            except (ssl.SSLError, socket.gaierror, pika.exceptions.AMQPConnectionError) as error:
                # (a handshake error may come bare; pika lets a failed name lookup through as it is)
                handshake = _tls_failure(error)
                if handshake:
                    raise BrokerError(f"RabbitMQ at {redact_url(node)} failed the TLS handshake: {handshake}") from None
                reason = _reason(error, params)
                errors.append(reason if len(nodes) == 1 else f"{redact_url(node)}: {reason}")
                continue
            if len(nodes) > 1:
                log.info("event=amqp_connected name=%s node=%s", name, redact_url(node))
            return connection
        backoff = next(delays, None)
        if backoff is None:
            raise BrokerError(
                f"cannot reach RabbitMQ at {redact_url(url)} after {attempts} attempts: {'; '.join(errors)}"
            ) from None
        log.warning("event=amqp_connect_retry attempt=%d backoff_s=%.1f error=%s", attempt, backoff, errors[-1])
        time.sleep(backoff)
        attempt += 1


def _reason(error: BaseException, params: pika.URLParameters) -> str:
    if isinstance(error, socket.gaierror):
        return f"the host name {params.host!r} does not resolve ({error.strerror})"
    return repr(error)


def _tls_failure(error: BaseException) -> str | None:
    """The TLS error under a connection error, if that is what it was: a wrong CA or a refused
    certificate is final, retrying cannot help."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return str(current)
        pending.extend(
            item
            for item in (*getattr(current, "args", ()), current.__cause__, current.__context__)
            if isinstance(item, BaseException)
        )
    return None
