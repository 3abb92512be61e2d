"""Settings resolved as: command-line flag, then ``FEDQ_*`` environment variable,
then the ``[job]`` table of a TOML job file, then the built-in default.

Each service declares its options as a list of :class:`Option`; the same list
builds the argparse flags and resolves the final values, so a new option is one
line and every source is handled the same way.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

DEFAULT_AMQP_URL = "amqp://guest:guest@localhost:5672/"
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
JOB_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class SettingsError(ValueError):
    """A setting the user gave cannot be used; the message is one sentence for the user."""


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Option:
    """One setting: its name (``buffer_size`` -> ``--buffer-size``, ``FEDQ_BUFFER_SIZE``)."""

    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env_var(self) -> str:
        return "FEDQ_" + self.name.upper()


def _parse_job(name: str) -> str:
    if not JOB_NAME_PATTERN.fullmatch(name):
        raise ValueError("use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


CONNECTION_OPTIONS = [
    Option("job", _parse_job, None, "name of the federation; jobs sharing RabbitMQ and Redis never see each other"),
    Option("amqp_url", str, DEFAULT_AMQP_URL, "RabbitMQ URL (amqps://... for TLS)"),
    Option("redis_url", str, DEFAULT_REDIS_URL, "Redis URL (rediss://... for TLS)"),
    Option("tls_ca", str, None, "CA bundle (PEM) that signs the RabbitMQ, Redis and management API servers' "
           "certificates, for amqps://, rediss:// and https:// URLs (default: the system's CAs)"),
    Option("tls_cert", str, None, "this participant's client certificate (PEM), for servers that demand mutual TLS"),
    Option("tls_key", str, None, "the client certificate's private key (PEM)"),
    Option("management_url", str, None, "RabbitMQ management API, e.g. https://rabbit:15671/ (default: the AMQP "
           "host, port 15672 over http, or 15671 over https for amqps://)"),
]


def redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def add_options(parser: argparse.ArgumentParser, options: list[Option]) -> None:
    """Add one flag per option; defaults stay None so we can tell 'not given'."""
    parser.add_argument("--config", default=None, help="TOML job file (its [job] table); FEDQ_CONFIG also works")
    for option in options:
        if option.parse is parse_bool:
            parser.add_argument(option.flag, dest=option.name, default=None, nargs="?", const="true",
                                metavar="BOOL", help=f"{option.help} (default {option.default})")
        else:
            # Choices are checked by resolve(), after parsing, for flags, environment and file alike.
            choices = f"; one of {', '.join(option.choices)}" if option.choices else ""
            parser.add_argument(option.flag, dest=option.name, default=None,
                                help=f"{option.help} (default {option.default}{choices})")


def load_job_file(path: str | None) -> Mapping[str, Any]:
    if not path:
        return {}
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"job file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"job file {path} is not valid TOML: {error}") from None
    # Settings live in a [job] table, or at the top level (where `job = "name"` is just a setting).
    table = document["job"] if isinstance(document.get("job"), dict) else document
    return table


def resolve(args: argparse.Namespace, options: list[Option],
            environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Return {name: value} taking each option from flag, environment, job file, default."""
    environ = os.environ if environ is None else environ
    job_file = load_job_file(getattr(args, "config", None) or environ.get("FEDQ_CONFIG"))
    known = {option.name for option in options}
    unknown = sorted(set(job_file) - known)
    if unknown:
        raise SettingsError(f"job file has unknown setting(s): {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for option in options:
        raw, source = getattr(args, option.name, None), option.flag
        if raw is None and option.env_var in environ:
            raw, source = environ[option.env_var], option.env_var
        if raw is None and option.name in job_file:
            raw, source = job_file[option.name], f"job file key {option.name}"
        if raw is None:
            values[option.name] = option.default
            continue
        try:
            value = option.parse(raw)
        except (TypeError, ValueError) as error:
            raise SettingsError(f"{source}={raw!r} is not valid: {error}") from None
        if option.choices and value not in option.choices:
            raise SettingsError(f"{source}={raw!r} must be one of {', '.join(option.choices)}")
        values[option.name] = value
    if "job" in values and values["job"] is None:
        raise SettingsError("name the federation with --job NAME (or FEDQ_JOB)")
    if "tls_ca" in values:
        _configure_tls(values)
    return values


def _configure_tls(values: dict[str, Any]) -> None:
    """TLS files are the process's: every connection it opens from now on uses them (``fedq.common.tls``),
    so they leave ``values`` here and no settings object carries them."""
    from fedq.common import tls

    paths = values.pop("tls_ca"), values.pop("tls_cert"), values.pop("tls_key")
    try:
        tls.configure(tls.TLSFiles(*paths))
    except tls.TLSError as error:
        raise SettingsError(str(error)) from None


def json_object(text: Any) -> dict[str, Any]:
    """A JSON object given as text (flag, environment) or as a TOML table."""
    value = json.loads(text) if isinstance(text, str) else text
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object")
    return value


def positive_int(text: Any) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def non_negative_int(text: Any) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def non_negative_float(text: Any) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be 0 or more")
    return value


def positive_float(text: Any) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be more than 0")
    return value


# Options every long-running service (coordinator, worker) takes.
SERVICE_OPTIONS = [
    Option("metrics_port", non_negative_int, 0, "serve Prometheus /metrics on this port (0: off)"),
    Option("log_level", lambda text: str(text).upper(), "INFO", "log level",
           choices=("DEBUG", "INFO", "WARNING", "ERROR")),
]
