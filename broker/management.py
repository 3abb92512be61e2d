"""The RabbitMQ management HTTP API: queue depths for ``fedq status`` and ``monitor``, users and
permissions for ``fedq admin``.

Its address is a setting (``--management-url``); by default the AMQP URL's host on port
15672 (http) or, for ``amqps://``, 15671 (https). Over https the server is verified with the
process's TLS files (``fedq.common.tls``), as every other connection is.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from base64 import b64encode
from typing import Any, cast

import pika

from fedq.common import tls
from fedq.common.settings import amqp_urls


class ManagementError(RuntimeError):
    """The management API refused or failed a request; the message is one sentence."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def default_management_url(amqp_url: str) -> str:
    """The management API of the first node of ``amqp_url``, at the plugin's default port."""
    amqp_url = amqp_urls(amqp_url)[0]
    params = pika.URLParameters(amqp_url)
    secure = amqp_url.startswith("amqps://")
    return f"{'https' if secure else 'http'}://{params.host}:{15671 if secure else 15672}/"


class ManagementAPI:
    def __init__(self, url: str, username: str, password: str, timeout: float = 10.0):
        self.url = url.rstrip("/") + "/"
        self.timeout = timeout
        self._authorization = "Basic " + b64encode(f"{username}:{password}".encode()).decode()
        self._context = tls.configured().context() if self.url.startswith("https://") else None

    @classmethod
    def for_amqp_url(cls, amqp_url: str, management_url: str | None = None, **kwargs: Any) -> ManagementAPI:
        """The API of the broker ``amqp_url`` names, with that URL's credentials.

        For a list of a cluster's nodes, the API of the first node that answers: every node's API
        reports the whole cluster, and a node may be down.
        """
        nodes = amqp_urls(amqp_url)
        if management_url is not None or len(nodes) == 1:
            return cls._for_node(nodes[0], management_url, **kwargs)
        failures = []
        for node in nodes:
            try:
                api = cls._for_node(node, None, **kwargs)
                if api.request("GET", "overview") is not None:
                    return api
            except ManagementError as error:
                failures.append(str(error))
        raise ManagementError("no node's management API answered: " + "; ".join(failures))

    @classmethod
    def _for_node(cls, amqp_url: str, management_url: str | None = None, **kwargs: Any) -> ManagementAPI:
        """The default address is a guess (the AMQP host, the management plugin's default port). When
        the AMQP port is not the default either, the guess may reach another broker on the same
        host, whose queues would be reported as this one's: the API found must say that its broker
        listens on the AMQP URL's port, or the caller is told to name the API."""
        params = pika.URLParameters(amqp_url)
        # A URL's parameters always hold plain credentials (guest's when the URL names no user).
        credentials = cast(pika.PlainCredentials, params.credentials)
        api = cls(
            management_url or default_management_url(amqp_url), credentials.username, credentials.password, **kwargs
        )
        if management_url is None and params.port not in (5671, 5672):
            listening = {
                listener.get("port")
                for listener in (api.request("GET", "overview") or {}).get("listeners", [])
                if str(listener.get("protocol", "")).startswith("amqp")
            }
            if params.port not in listening:
                raise ManagementError(
                    f"the management API at {api.url} belongs to a broker listening on AMQP port(s) "
                    f"{', '.join(map(str, sorted(listening))) or 'none'}, not {params.port}: name "
                    "this broker's API with --management-url"
                )
        return api

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """``method`` on ``api/<path>`` (path segments already quoted); the decoded JSON reply, or None."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + "api/" + path,
            data=data,
            method=method,
            headers={"Authorization": self._authorization, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._context) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read()[:300].decode(errors="replace")
            raise ManagementError(
                f"the RabbitMQ management API answered {method} {path} with {error.code}: {detail}", error.code
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise ManagementError(f"the RabbitMQ management API at {self.url} cannot be reached: {error}") from None
        return json.loads(payload) if payload else None


def quote(segment: str) -> str:
    """One path segment of an API URL (vhost ``/`` is ``%2F``)."""
    return urllib.parse.quote(segment, safe="")
