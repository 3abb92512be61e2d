"""The ``fedq`` command: one entry point, subcommands loaded lazily.

Subcommands live with the package they belong to (``fedq.coordinator.service.cli``,
``worker.cli``, ...) and are named here as paths, not imported: ``common`` must
not depend on the services, and ``fedq status`` should not pay torch's
multi-second import. A path names a module or a ``module:Object``; either
provides ``HELP``, ``add_arguments(parser)`` and ``main(args) -> exit code``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
from typing import Any

SUBCOMMANDS = {
    "demo": "fedq.coordinator.ops.demo",
    "coordinator": "fedq.coordinator.service.cli",
    "worker": "fedq.worker.cli",
    "status": "fedq.coordinator.ops.status",
    "monitor": "fedq.coordinator.ops.monitor",
    "report": "fedq.coordinator.ops.report",
    "history": "fedq.coordinator.ops.history:History",
    "show": "fedq.coordinator.ops.history:Show",
    "export": "fedq.coordinator.ops.history:Export",
    "replay": "fedq.coordinator.ops.history:Replay",
    "rollback": "fedq.coordinator.ops.history:Rollback",
    "archive": "fedq.coordinator.ops.archive",
    "dead": "fedq.coordinator.ops.dead",
    "admin": "fedq.coordinator.ops.admin",
    "jobs": "fedq.coordinator.ops.jobs:Jobs",
    "delete": "fedq.coordinator.ops.jobs:Delete",
}

SUMMARIES = {
    "demo": "run a coordinator and worker processes on the built-in digits task until a target accuracy",
    "coordinator": "run the coordinator of a job",
    "worker": "run a worker of a job",
    "status": "show a job's head version, queue depths and consumers",
    "monitor": "live view of queues, training progress and workers",
    "report": "write an HTML report (accuracy over time, staleness, updates per worker) from the history",
    "history": "list a job's versions with staleness and metrics, and its Redis memory",
    "show": "show one version's metadata and applied updates",
    "export": "write one version to a safetensors file",
    "replay": "recompute versions from the logged updates and verify them bit for bit",
    "rollback": "make an old version the head again, as a new version",
    "archive": "move a job's older history from Redis to its archive now",
    "dead": "list a job's dead letters with their reasons; drain them or requeue them",
    "admin": "enroll, list and revoke a job's worker identities (RabbitMQ users, Redis ACL users)",
    "jobs": "list every job in Redis: status, head, live workers, Redis memory, archive size and URL",
    "delete": "delete a job's Redis keys, queues and exchanges, and with --archive its archive segments",
}


class UserError(Exception):
    """An error the user can fix; printed as one sentence, no traceback."""


def human_size(nbytes: float) -> str:
    """Bytes as people read them: 812 B, 4.0 KiB, 3.8 MiB, 17.2 GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types whose message is a sentence for the user (imported lazily). A module that
    was never imported raised nothing: the tasks package (torch, seconds to import) and the broker's
    are asked only if loaded, so that an error message comes at once."""
    from fedq.common.settings import SettingsError
    from fedq.common.store import StoreError

    kinds: list[type[BaseException]] = [UserError, SettingsError, StoreError]
    if "fedq.common.tasks.base" in sys.modules:
        kinds.append(sys.modules["fedq.common.tasks.base"].TaskPluginError)
    if "fedq.broker.connection" in sys.modules:
        kinds.append(sys.modules["fedq.broker.connection"].BrokerError)
    return tuple(kinds)


def version() -> str:
    """The installed package's version (pyproject.toml's)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("fedq")
    except PackageNotFoundError:
        return "unknown (not installed: pip install -e .)"


def _subcommand(name: str) -> Any:
    """The module (or ``module:Object``) that implements ``fedq <name>``."""
    module_name, _, object_name = SUBCOMMANDS[name].partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, object_name) if object_name else module


def _parser(name: str) -> argparse.ArgumentParser:
    command = _subcommand(name)
    parser = argparse.ArgumentParser(prog=f"fedq {name}", description=command.HELP)
    command.add_arguments(parser)
    return parser


@functools.lru_cache(maxsize=1)
def settings_by_command() -> dict[str, frozenset[str]]:
    """Every command's settings by name (what its job-file table and FEDQ_* variables may hold).
    Imports every command's module (about a second, no torch): asked only when a job file or the
    environment holds something the running command does not read."""
    return {name: frozenset(_parser(name).get_default("fedq_settings") or ()) for name in SUBCOMMANDS}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        print(f"fedq {version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser = argparse.ArgumentParser(
            prog="fedq", description="Asynchronous federated learning over RabbitMQ and Redis."
        )
        parser.add_argument("-V", "--version", action="store_true", help="print fedq's version and exit")
        commands = parser.add_subparsers(dest="command", metavar="COMMAND")
        for name, summary in SUMMARIES.items():
            commands.add_parser(name, help=summary)
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0 if argv else 2
        parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
    name, rest = argv[0], argv[1:]
    module = _subcommand(name)
    parser = _parser(name)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `fedq status | head`: the reader left; say nothing more (Python's own flush at exit
        # would hit the closed pipe again, hence the redirect).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except _user_errors() as error:
        print(f"fedq {name}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    # Run as `python -m fedq.common.cli`, this file is `__main__`, and the subcommands importing
    # `fedq.common.cli` get a second copy with a UserError class of its own that `__main__`'s
    # except clause would not catch (a traceback instead of one sentence). Run the one copy.
    from fedq.common.cli import main as package_main

    sys.exit(package_main())
