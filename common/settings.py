"""Settings resolved as: command-line flag, then ``FEDQ_*`` environment variable,
then the TOML job file, then the built-in default.

Each service declares its options as a list of :class:`Option`; the same list
builds the argparse flags and resolves the final values, so a new option is one
line and every source is handled the same way.

One job file serves every command of a job. Its ``[job]`` table (or its top level)
holds what is shared, and a table named after a command (``[coordinator]``,
``[worker]``, ``[status]``, ...) what only that command reads, overriding the shared
value. A command takes the keys it knows and leaves the others to the commands they
belong to; a key that no command knows is refused, with the nearest real name. The
environment is shared the same way: a ``FEDQ_*`` variable this command does not read
is left alone, one that no command reads is named in a warning.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
import tomllib
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

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


def amqp_urls(text: str) -> list[str]:
    """The brokers of an ``amqp_url`` setting, in the order they are tried: it names one broker, or the
    nodes of a RabbitMQ cluster as a comma-separated list (a comma in a password is written ``%2C``)."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_amqp_url(text: Any) -> str:
    """One AMQP URL, or a comma-separated list of a cluster's nodes, each checked before anything
    connects. The nodes of a list must share user, password and virtual host: a cluster knows one set
    of users, and a list that mixes them is a copying mistake that would surface only at failover."""
    if str(text).startswith("memory://"):  # the in-memory transport (tests)
        return str(text)
    urls = [_check_amqp_url(url) for url in amqp_urls(str(text))]
    if not urls:
        raise ValueError("it names no broker, e.g. amqp://user:password@host:5672/")
    if len({_login_and_vhost(url) for url in urls}) > 1:
        raise ValueError("the URLs of a list must name the same user, password and virtual host")
    return ",".join(urls)


def _login_and_vhost(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.netloc.rpartition("@")[0], parts.path.lstrip("/")


def _check_amqp_url(url: str) -> str:
    """An AMQP URL with a host and a numeric port: pika reads ``amqp:/x`` as localhost, and fails on
    ``amqp://h:port/`` with an IndexError."""
    example = "e.g. amqp://user:password@host:5672/"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"an AMQP URL starts with amqp:// or amqps://, {example}")
    try:
        port, host = parts.port, parts.hostname
    except ValueError:
        raise ValueError(f"its port is not a number from 0 to 65535, {example}") from None
    if not host or (port is None and parts.netloc.endswith(":")):
        raise ValueError(f"it names no host, {example}")
    return url


CONNECTION_OPTIONS = [
    Option("job", _parse_job, None, "name of the federation; jobs sharing RabbitMQ and Redis never see each other"),
    Option(
        "amqp_url",
        _parse_amqp_url,
        DEFAULT_AMQP_URL,
        "RabbitMQ URL (amqps://... for TLS), or a comma-separated list of a cluster's nodes, tried in turn",
    ),
    Option("redis_url", str, DEFAULT_REDIS_URL, "Redis URL (rediss://... for TLS)"),
    Option(
        "tls_ca",
        str,
        None,
        "CA bundle (PEM) that signs the RabbitMQ, Redis and management API servers' "
        "certificates, for amqps://, rediss:// and https:// URLs (default: the system's CAs)",
    ),
    Option("tls_cert", str, None, "this participant's client certificate (PEM), for servers that demand mutual TLS"),
    Option("tls_key", str, None, "the client certificate's private key (PEM)"),
    Option(
        "management_url",
        str,
        None,
        "RabbitMQ management API, e.g. https://rabbit:15671/ (default: the AMQP "
        "host, port 15672 over http, or 15671 over https for amqps://)",
    ),
]


def redact_url(url: str) -> str:
    """``url`` (or a comma-separated list of URLs) without its passwords, for messages and logs."""
    return ",".join(_redact_one(part) for part in url.split(","))


def _redact_one(url: str) -> str:
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


# FEDQ_* variables that are not settings of a command: the job file's path, the fault injector
# (fedq.common.obs.faults), deploy/setup.sh's and make-certs.sh's own, and the tests'.
NOT_SETTINGS = (
    "FEDQ_CONFIG",
    "FEDQ_CRASH_AT",
    "FEDQ_AMQP_PORT",
    "FEDQ_REDIS_PORT",
    "FEDQ_CERT_DAYS",
    "FEDQ_CERT_SANS",
    "FEDQ_PRIVATE_SERVER",
    "FEDQ_TEST_",
)


def add_options(parser: argparse.ArgumentParser, options: list[Option]) -> None:
    """Add one flag per option; defaults stay None so we can tell 'not given'.

    The parser remembers which command it belongs to (``fedq <command>``, from its prog) and
    the settings that command reads, for the job file's per-command tables."""
    command = parser.prog.split()[1] if parser.prog.startswith("fedq ") and len(parser.prog.split()) == 2 else None
    parser.set_defaults(fedq_command=command, fedq_settings=tuple(option.name for option in options))
    parser.add_argument(
        "--config",
        default=None,
        help="TOML job file: its [job] table, and the table named after this command"
        + (f" ([{command}])" if command else "")
        + "; FEDQ_CONFIG also works",
    )
    for option in options:
        if option.parse is parse_bool:
            parser.add_argument(
                option.flag, dest=option.name, default=None, nargs="?", const="true", metavar="BOOL", help=_help(option)
            )
        else:
            # Choices are checked by resolve(), after parsing, for flags, environment and file alike.
            parser.add_argument(option.flag, dest=option.name, default=None, help=_help(option))


def _help(option: Option) -> str:
    """The option's help with its default and choices, unless its own text says the default
    (``--job`` has none: it is required)."""
    notes = []
    if "(default" not in option.help and option.default not in (None, ""):
        notes.append(f"default {option.default}")
    elif option.name == "job":
        notes.append(f"required, or {option.env_var}")
    if option.choices:
        notes.append(f"one of {', '.join(option.choices)}")
    # argparse formats help with %: a bare "80 %" must not break --help.
    return (option.help + (f" ({'; '.join(notes)})" if notes else "")).replace("%", "%%").replace("%%%%", "%%")


def _settings_by_command() -> dict[str, frozenset[str]]:
    from fedq.common.cli import settings_by_command  # the one list of commands; imports each command's module

    return settings_by_command()


def _nearest(name: str, candidates: set[str]) -> str:
    close = difflib.get_close_matches(name, sorted(candidates), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def load_job_file(
    path: str | None,
    command: str | None = None,
    commands: Callable[[], dict[str, frozenset[str]]] = _settings_by_command,
    mine: frozenset[str] | None = None,
) -> dict[str, Any]:
    """The settings of the job file at ``path`` for ``command``: the shared ones, then the command's
    own table over them. Refuses, in one sentence, a key or table no command knows.

    ``mine`` (the command's own settings) allows a short cut: a file whose every key the command
    reads, in no table but [job], is taken without asking ``commands`` (which imports every
    command's module)."""
    if not path:
        return {}
    try:
        with open(path, "rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"job file {path} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"job file {path} is not valid TOML: {error}") from None
    if mine is not None:
        flat = dict(document["job"]) if isinstance(document.get("job"), dict) else {}
        flat |= {key: value for key, value in document.items() if not (key == "job" and isinstance(value, dict))}
        if set(flat) <= mine:
            return flat
    known_by = commands()
    # A table named after a command is that command's; anything else at the top level is shared
    # (a setting's own value may be a table: task_params). `job = "name"` at the top level is the
    # job setting, `[job]` the shared table.
    roles = {key: value for key, value in document.items() if key in known_by and isinstance(value, dict)}
    shared = {key: value for key, value in document.items() if key not in roles and key != "job"}
    if isinstance(document.get("job"), dict):
        shared |= document["job"]
    elif "job" in document:
        shared["job"] = document["job"]
    every = frozenset().union(*known_by.values())
    for table, entries in [("job", shared), *roles.items()]:
        allowed = every if table == "job" else known_by[table]
        unknown = sorted(key for key in entries if key not in allowed)
        if not unknown:
            continue
        key = unknown[0]
        if "-" in key and key.replace("-", "_") in allowed:
            raise SettingsError(
                f"job file {path}: write {key.replace('-', '_')} for {key} (settings use "
                f"underscores, as in FEDQ_{key.replace('-', '_').upper()})"
            )
        where = "no fedq command reads" if table == "job" else f"fedq {table} does not read"
        raise SettingsError(f"job file {path}: {where} {', '.join(unknown)}{_nearest(key, set(allowed))}")
    taken = {key: value for key, value in shared.items() if command is None or key in known_by.get(command, ())}
    return taken | (roles.get(command, {}) if command else {})


def _warn_about_unknown_environment(
    environ: Mapping[str, str], known: set[str], commands: Callable[[], dict[str, frozenset[str]]]
) -> None:
    """A FEDQ_* variable that no command reads is probably a typo: say so once, on stderr."""
    strangers = [
        name for name in environ if name.startswith("FEDQ_") and name not in known and not name.startswith(NOT_SETTINGS)
    ]
    if not strangers:
        return
    every = {"FEDQ_" + name.upper() for names in commands().values() for name in names}
    for name in sorted(set(strangers) - every):
        print(
            f"fedq: warning: the environment variable {name} is not a fedq setting and is ignored"
            f"{_nearest(name, every)}",
            file=sys.stderr,
        )


def resolve(
    args: argparse.Namespace,
    options: list[Option],
    environ: Mapping[str, str] | None = None,
    commands: Callable[[], dict[str, frozenset[str]]] | None = None,
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Return {name: value} taking each option from flag, environment, job file, default.

    ``commands`` gives every command's settings (default: the ``fedq`` commands'), to tell a
    key or variable of another command from one that nobody reads. ``sources``, if given, is
    filled with where each setting the user gave came from (``--buffer-size``,
    ``FEDQ_BUFFER_SIZE``, ``job file key buffer_size``); defaults are not in it."""
    environ = os.environ if environ is None else environ
    command = getattr(args, "fedq_command", None)
    mine = frozenset(option.name for option in options)
    if commands is None:
        commands = _settings_by_command if command else (lambda: {"this command": mine})
    job_file = load_job_file(
        getattr(args, "config", None) or environ.get("FEDQ_CONFIG"),
        command,
        lambda: {**commands(), **({command: mine} if command else {"this command": mine})},
        mine,
    )
    _warn_about_unknown_environment(environ, {option.env_var for option in options}, commands)
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
            shown = redact_url(raw) if option.name.endswith("_url") and isinstance(raw, str) else raw
            raise SettingsError(f"{source}={shown!r} is not valid: {error}") from None
        if option.choices and value not in option.choices:
            raise SettingsError(f"{source}={raw!r} must be one of {', '.join(option.choices)}")
        values[option.name] = value
        if sources is not None:
            sources[option.name] = source
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
    Option(
        "redis_wait_replicas",
        non_negative_int,
        0,
        "replicas of the Redis master that must hold each version and update blob before its messages "
        "are acknowledged (Redis WAIT); 1 or more on a Redis Cluster or Sentinel, or a failover may "
        "lose the last versions (0: the master's word is enough)",
    ),
    Option(
        "log_level", lambda text: str(text).upper(), "INFO", "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    ),
]
