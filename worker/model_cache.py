"""The versions this worker process holds, and loading a task's version from them as downlink diffs.

A worker trains version after version of one job. Holding the last few it loaded, it can read a
newer one as the chain of exact diffs Redis keeps between consecutive versions (``modeldiff:<v>``,
common/wire/downlink.py) instead of the whole model, when that chain is stored and smaller;
:meth:`fedq.common.store.versions.VersionStore.load_weights_from` decides, and reads the full
weights otherwise. Whatever the path, the weights returned matched the digest the task names.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from fedq.common.store.versions import LoadedWeights, VersionStore
from fedq.common.wire import codec

# Two cover a worker that trains every version or every other one; each is a full copy of the model.
HELD_VERSIONS = 2


@dataclass
class DownlinkStats:
    """What this worker read for the versions it loaded."""

    bytes_read: int = 0
    loads: Counter[str] = field(default_factory=Counter)  # source -> count: "held", "cache", "diffs", "full"
    fallbacks: Counter[str] = field(default_factory=Counter)  # reason -> full reads that diffs could have spared

    @property
    def diff_loads(self) -> int:
        return self.loads["diffs"]

    @property
    def full_loads(self) -> int:
        return self.loads["full"]


@dataclass(frozen=True)
class _Held:
    weights: codec.Weights
    digest: str


class HeldVersions:
    """The newest ``keep`` versions this process loaded, verified, and the loads they serve.

    ``use_diffs`` False loads every version in full (the held versions still serve repeats).
    A Redis user that may not read diffs (granted before they existed) turns diffs off for
    the rest of the process after the first refusal.
    """

    def __init__(self, versions: VersionStore, keep: int = HELD_VERSIONS, use_diffs: bool = True):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, not {keep}")
        self.versions = versions
        self.keep = keep
        self.use_diffs = use_diffs
        self.stats = DownlinkStats()
        self._held: dict[int, _Held] = {}
        self._lock = threading.Lock()

    def held(self) -> list[int]:
        """The versions held, oldest first."""
        with self._lock:
            return sorted(self._held)

    def load(self, version: int, expected_digest: str) -> codec.Weights:
        """The weights of ``version``, verified against ``expected_digest`` (the task's); callers
        must not modify them. Raises what :meth:`VersionStore.load_weights` raises."""
        return self.load_counted(version, expected_digest).weights

    def load_counted(self, version: int, expected_digest: str) -> LoadedWeights:
        """:meth:`load`, with how the weights were read."""
        with self._lock:
            held = self._held.get(version)
            if held is not None and held.digest == expected_digest:
                self.stats.loads["held"] += 1
                return LoadedWeights(held.weights, version, "held", 0)
            older = [candidate for candidate in self._held if candidate < version] if self.use_diffs else []
            base = max(older, default=None)
            base_weights = self._held[base].weights if base is not None else None
        loaded = self.versions.load_weights_from(base, base_weights, version, expected_digest)
        with self._lock:
            self.stats.bytes_read += loaded.bytes_read
            self.stats.loads[loaded.source] += 1
            if loaded.fallback is not None:
                self.stats.fallbacks[loaded.fallback] += 1
                if loaded.fallback == "denied":
                    self.use_diffs = False
            self._held[version] = _Held(loaded.weights, expected_digest)
            for oldest in sorted(self._held)[: max(len(self._held) - self.keep, 0)]:
                del self._held[oldest]
        return loaded
