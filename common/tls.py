"""TLS for every connection a fedq process opens: RabbitMQ (``amqps://``), Redis (``rediss://``)
and the RabbitMQ management API (``https://``).

A process has one identity, so the files are settings of the process (``--tls-ca``,
``--tls-cert``, ``--tls-key``, or ``FEDQ_TLS_*``, or the job file), applied by
:func:`configure` when the settings are resolved and read by every connection it opens.
Server certificates are always verified against the CA (the system's when none is given)
and host names always checked; the client certificate and key are sent when given, for
brokers that demand mutual TLS.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass


class TLSError(ValueError):
    """The TLS files cannot be used; the message is one sentence for the user."""


@dataclass(frozen=True)
class TLSFiles:
    ca_file: str | None = None  # PEM bundle of the CA(s) that sign the servers' certificates
    cert_file: str | None = None  # this participant's client certificate (PEM), for mutual TLS
    key_file: str | None = None  # its private key (PEM)

    def __post_init__(self):
        if bool(self.cert_file) != bool(self.key_file):
            raise TLSError("give the client certificate and its key together (--tls-cert and --tls-key)")
        for what, path in (("CA file", self.ca_file), ("certificate", self.cert_file), ("key", self.key_file)):
            if path and not os.path.isfile(path):
                raise TLSError(f"TLS {what} {path} does not exist")

    def context(self) -> ssl.SSLContext:
        """A client context: verify the server against the CA, check its host name, present our certificate."""
        try:
            context = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                context.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as error:
            raise TLSError(f"the TLS files cannot be loaded: {error}") from None
        return context

    def redis_arguments(self) -> dict[str, object]:
        """redis-py's keyword arguments for a ``rediss://`` connection with these files."""
        arguments: dict[str, object] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
        if self.ca_file:
            arguments["ssl_ca_certs"] = self.ca_file
        if self.cert_file:
            arguments.update(ssl_certfile=self.cert_file, ssl_keyfile=self.key_file)
        return arguments


_configured = TLSFiles()


def configure(files: TLSFiles) -> None:
    """Use ``files`` for every TLS connection this process opens from now on."""
    global _configured
    _configured = files


def configured() -> TLSFiles:
    return _configured
