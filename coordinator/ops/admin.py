"""``fedq admin``: give a job's parties identities of their own, list them, revoke them.

    fedq admin enroll --job J --worker-id site-a [--role worker] [--out site-a.toml]
    fedq admin list   --job J
    fedq admin revoke --job J --worker-id site-a

Run it with administrator credentials: ``--amqp-url`` names a RabbitMQ user tagged
``administrator`` (users and permissions go through the management API, ``--management-url``)
and ``--redis-url`` a Redis user that may run ``ACL``. ``enroll`` generates a password, creates
the RabbitMQ user and its permissions and the Redis ACL user (exactly what
:mod:`fedq.coordinator.ops.roles` grants the role), records a worker's identity in the job
(from then on the coordinator accepts updates only from enrolled workers, each from its own
user) and writes a job file for the site, readable only by its owner:
``fedq worker --config site-a.toml``. The site's URLs are the administrator's with the new
credentials, or ``--site-amqp-url``/``--site-redis-url`` (hosts as the site sees them).

``revoke`` marks the identity revoked first (the coordinator refuses the worker's next update),
then deletes its RabbitMQ user and closes its connections (the tasks it held go back to the
queue), and deletes its Redis user (Redis closes its connections).
"""

from __future__ import annotations

import argparse
import os
import secrets
import time
from urllib.parse import quote, urlsplit, urlunsplit

import pika
import redis

from fedq.broker.management import ManagementAPI, ManagementError
from fedq.broker.management import quote as quote_segment
from fedq.common.cli import UserError
from fedq.common.settings import CONNECTION_OPTIONS, add_options, amqp_urls, resolve
from fedq.common.store import ModelStore, StoreError, connect_every_server, connect_redis
from fedq.common.store.identities import identity_user
from fedq.coordinator.ops.roles import ROLES, Grant, RoleError, grant

HELP = "Enroll, list and revoke a job's worker identities (RabbitMQ users and permissions, Redis ACL users)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, CONNECTION_OPTIONS)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    enroll = actions.add_parser("enroll", help="create an identity and write its job file")
    enroll.add_argument("--worker-id", required=True, help="the worker's (or coordinator's, monitor's) name")
    enroll.add_argument("--role", choices=ROLES, default="worker", help="what it may do (default: worker)")
    enroll.add_argument("--out", default=None, help="job file to write (default: <job>-<name>.toml), mode 0600")
    enroll.add_argument(
        "--site-amqp-url",
        default=None,
        help="the RabbitMQ URL as the site reaches it (default: --amqp-url); credentials are replaced",
    )
    enroll.add_argument(
        "--site-redis-url",
        default=None,
        help="the Redis URL as the site reaches it (default: --redis-url); credentials are replaced",
    )
    actions.add_parser("list", help="the job's enrolled identities")
    revoke = actions.add_parser("revoke", help="revoke an identity: refused at once, disconnected")
    revoke.add_argument("--worker-id", required=True)


class Provisioner:
    """Users and permissions of one job on RabbitMQ (management API) and Redis (ACL)."""

    def __init__(self, amqp_url: str, redis_url: str, job: str, management_url: str | None = None):
        self.job = job
        self.api = ManagementAPI.for_amqp_url(amqp_url, management_url)
        self.vhost = pika.URLParameters(amqp_urls(amqp_url)[0]).virtual_host
        self.redis = connect_redis(redis_url, job=job)
        self.store = ModelStore(self.redis, job)
        # Each Redis server keeps its own ACL users: a replica that takes over must know them too.
        self.acl_servers = connect_every_server(redis_url)

    def create(self, access: Grant, password: str) -> str:
        """Create (or reset) the users of ``access``; returns the user name."""
        user = identity_user(self.job, access.name)
        permissions = access.rabbitmq
        self.api.request("PUT", f"users/{quote_segment(user)}", {"password": password, "tags": permissions.tags})
        self.api.request(
            "PUT",
            f"permissions/{quote_segment(self.vhost)}/{quote_segment(user)}",
            {"configure": permissions.configure, "write": permissions.write, "read": permissions.read},
        )
        for server in self.acl_servers:
            server.execute_command("ACL", "SETUSER", user, "reset", "on", f">{password}", *access.redis_rules)
        if access.role == "worker":
            self.store.identities.enroll(access.name, user)
        return user

    def revoke(self, name: str) -> dict[str, int | bool]:
        """Refuse, delete and disconnect ``name``'s users; what was done, for the report."""
        user = identity_user(self.job, name)
        identity = self.store.identities.revoke(name)  # first: the coordinator refuses its next update
        try:  # then no new connection, and only then away with the open ones, which could not come back
            self.api.request("DELETE", f"users/{quote_segment(user)}")
            rabbit_user = True
        except ManagementError as error:
            if error.status != 404:
                raise
            rabbit_user = False
        closed = 0
        for connection in self.api.request("GET", "connections?columns=name,user") or []:
            if connection.get("user") == user:
                try:
                    self.api.request("DELETE", f"connections/{quote_segment(connection['name'])}")
                    closed += 1
                except ManagementError as error:
                    if error.status != 404:  # closed by itself meanwhile
                        raise
        # (Redis closes the deleted user's clients)
        redis_user = any([bool(server.execute_command("ACL", "DELUSER", user)) for server in self.acl_servers])
        return {
            "identity": identity is not None,
            "rabbitmq_user": rabbit_user,
            "connections_closed": closed,
            "redis_user": redis_user,
        }

    def connections(self) -> dict[str, int]:
        """Open RabbitMQ connections per user."""
        counts: dict[str, int] = {}
        for connection in self.api.request("GET", "connections?columns=user") or []:
            counts[connection.get("user")] = counts.get(connection.get("user"), 0) + 1
        return counts


def site_url(url: str, user: str, password: str) -> str:
    """``url`` (or each URL of a comma-separated list) with ``user``:``password`` as its credentials."""
    return ",".join(_with_login(part, user, password) for part in url.split(","))


def _with_login(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"))


def write_job_file(path: str, job: str, name: str, role: str, amqp_url: str, redis_url: str) -> None:
    """A TOML job file with the credentials, created readable by its owner only."""
    lines = [
        "# fedq job file for " + f"{role} {name!r} of job {job!r}, written by `fedq admin enroll`.",
        "# It holds passwords: hand it to the site over a secure channel. Add tls_ca/tls_cert/tls_key",
        "# (paths on the site's machine) when the servers use TLS.",
        "[job]",
        f'job = "{job}"',
        f'amqp_url = "{amqp_url}"',
        f'redis_url = "{redis_url}"',
    ]
    if role == "worker":
        lines.append(f'worker_id = "{name}"')
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.chmod(path, 0o600)  # an existing file keeps its mode through O_CREAT


def main(args: argparse.Namespace) -> int:
    values = resolve(args, CONNECTION_OPTIONS)
    job = values["job"]
    try:
        provisioner = Provisioner(values["amqp_url"], values["redis_url"], job, values["management_url"])
        if args.action == "enroll":
            return _enroll(provisioner, args, values)
        if args.action == "revoke":
            done = provisioner.revoke(args.worker_id)
            if not any(done.values()):
                raise UserError(f"job {job!r} has no identity {args.worker_id!r} to revoke")
            print(
                f"revoked {args.worker_id!r} of job {job!r}: updates refused from now on; RabbitMQ user "
                f"{'deleted' if done['rabbitmq_user'] else 'was already gone'}, {done['connections_closed']} "
                f"connection(s) closed; Redis user {'deleted' if done['redis_user'] else 'was already gone'}"
            )
            return 0
        return _list(provisioner, job)
    except RoleError as error:
        raise UserError(str(error)) from None
    except ManagementError as error:
        raise UserError(
            f"{error} (fedq admin needs a RabbitMQ user tagged administrator, and the management "
            "plugin: see --management-url)"
        ) from None
    except redis.ResponseError as error:
        raise StoreError(
            f"Redis refused the ACL change: {error} (fedq admin needs a Redis user that may run ACL)"
        ) from None


def _enroll(provisioner: Provisioner, args: argparse.Namespace, values: dict) -> int:
    job = values["job"]
    access = grant(args.role, job, args.worker_id)
    password = secrets.token_urlsafe(24)
    user = provisioner.create(access, password)
    out = args.out or f"{job}-{args.worker_id}.toml"
    write_job_file(
        out,
        job,
        args.worker_id,
        args.role,
        site_url(args.site_amqp_url or values["amqp_url"], user, password),
        site_url(args.site_redis_url or values["redis_url"], user, password),
    )
    print(
        f"enrolled {args.role} {args.worker_id!r} of job {job!r} as user {user!r}; job file {out} "
        f"(mode 0600): fedq {'worker' if args.role == 'worker' else args.role} --config {out}"
    )
    return 0


def _list(provisioner: Provisioner, job: str) -> int:
    identities = provisioner.store.identities.all()
    if not identities:
        print(f"job {job!r} has no enrolled workers: it accepts updates from any user that can publish")
        return 0
    connections = provisioner.connections()
    print(f"{'worker':<24} {'user':<40} {'enrolled':<20} {'state':<22} connections")
    for identity in identities:
        state = "revoked " + _when(identity.revoked_at) if identity.revoked else "active"
        print(
            f"{identity.worker_id:<24} {identity.user:<40} {_when(identity.enrolled_at):<20} {state:<22} "
            f"{connections.get(identity.user, 0)}"
        )
    return 0


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(stamp))
