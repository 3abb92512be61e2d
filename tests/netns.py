"""Other hosts for tests: Linux network namespaces on a private bridge.

:class:`Hosts` creates a bridge ``fq-br-<tag>`` with address ``10.200.0.1/24`` in the test's own
namespace and, per host, a namespace with a veth pair plugged into the bridge at ``10.200.0.<n>``.
A process started with :meth:`Hosts.command` runs in that namespace: it has its own loopback and
reaches the servers only through the bridge, at ``10.200.0.1``, as a machine on another host
would (the throwaway PKI's server certificate names 10.200.0.1-9). Needs root and ``ip``;
:func:`available` says whether this machine can.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess

SERVER_ADDRESS = "10.200.0.1"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def available() -> bool:
    """Whether network namespaces can be made here (root, iproute2, a kernel that allows them)."""
    if shutil.which("ip") is None:
        return False
    probe = f"fq-probe-{secrets.token_hex(3)}"
    if _ip("netns", "add", probe, check=False).returncode != 0:
        return False
    _ip("netns", "del", probe, check=False)
    return True


class Hosts:
    def __init__(self, names: list[str]):
        if len(names) > 8:
            raise ValueError("at most 8 hosts (10.200.0.2-9)")
        self.tag = secrets.token_hex(3)
        self.bridge = f"fq-br-{self.tag}"
        self.addresses = {name: f"10.200.0.{index + 2}" for index, name in enumerate(names)}
        self.namespaces = {name: f"fq-{self.tag}-{index}" for index, name in enumerate(names)}

    def __enter__(self) -> Hosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{SERVER_ADDRESS}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for index, (name, namespace) in enumerate(self.namespaces.items()):
                outside, inside = f"fq-{self.tag}-o{index}", f"fq-{self.tag}-i{index}"
                _ip("netns", "add", namespace)
                _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
                _ip("link", "set", outside, "master", self.bridge)
                _ip("link", "set", outside, "up")
                _ip("link", "set", inside, "netns", namespace)
                _ip("-n", namespace, "addr", "add", f"{self.addresses[name]}/24", "dev", inside)
                _ip("-n", namespace, "link", "set", inside, "up")
                _ip("-n", namespace, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def command(self, host: str, argv: list[str]) -> list[str]:
        """``argv`` run on ``host``."""
        return ["ip", "netns", "exec", self.namespaces[host], *argv]

    def __exit__(self, *exc_info) -> None:
        for namespace in self.namespaces.values():
            _ip("netns", "del", namespace, check=False)  # takes its end of the veth pair, and so both ends
        _ip("link", "del", self.bridge, check=False)
