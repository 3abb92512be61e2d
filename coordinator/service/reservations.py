"""Tasks opened ahead of dispatch, so that handing one out is a publish and no Redis round trip.

A task must be in the ledger before the broker has it: an update answering it must be accepted
even if the coordinator dies right after publishing. Writing each entry just before its publish
was the last Redis round trip per update (13-28 % of the loop in ``bench/throughput.py
--profile``). Instead, every commit writes, in the round trip that stages the new weights,
entries for the next tasks the coordinator expects to hand out at the new version, marked
reserved (``common/store/ledger.py``); dispatch takes its task ids from them. The next commit
rewrites the reserved entries that went out as plain ones, with their real issue time, and
closes the others; so does a coordinator with no update to handle.

An id is handed out only at the version it was reserved for, and within ``RESERVATION_SECONDS``
of its reservation. Its entry's issue time is later still, by as much again: the latest the task
can have been published. A successor coordinator, which cannot know whether a reserved task went
out, accepts its update and never ends its lease early, but does not count it in flight.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedq.common.store.ledger import OpenTask

# How long after its reservation a reserved id may still be handed out (see the module's docstring).
RESERVATION_SECONDS = 5.0
# At most this many ids per version: a job with a thousand workers in a synchronous round opens
# the rest in one round trip at dispatch, as without reservations.
MOST_RESERVED = 256


@dataclass(frozen=True)
class LedgerChanges:
    """What a commit writes to the ledger for the reservations: ``opened`` (the new version's
    reserved entries, and the plain entries of reserved tasks that went out) and ``closed``."""

    version: int
    reserved_at: float
    reserved: dict[str, OpenTask]
    published: dict[str, OpenTask]
    closed: list[str]

    @property
    def opened(self) -> dict[str, OpenTask]:
        return self.reserved | self.published


@dataclass
class Reservations:
    """This coordinator's reserved task ids: those it may still hand out, and those it handed out
    whose entries are still marked reserved."""

    per_version: int
    version: int | None = None  # the version the unused ids were reserved for
    reserved_at: float = 0.0
    unused: list[str] = field(default_factory=list)
    # Handed out since the last commit: their ledger entries still say reserved.
    published: set[str] = field(default_factory=set)
    # Written (or being written) to the ledger and never handed out: nothing can answer them.
    _unpublished: set[str] = field(default_factory=set)

    def take(self, version: int, count: int, now: float) -> list[str]:
        """Up to ``count`` reserved ids to hand out now at ``version`` (none when the reservations
        are for another version or too old)."""
        if version != self.version or now > self.reserved_at + RESERVATION_SECONDS:
            return []
        taken, self.unused = self.unused[:count], self.unused[count:]
        self.published.update(taken)
        self._unpublished.difference_update(taken)
        return taken

    def changes_for_commit(self, version: int, now: float, open_tasks: Mapping[str, OpenTask]) -> LedgerChanges:
        """The ledger changes to write with the commit of ``version``: fresh reservations for it,
        the reserved tasks handed out since the last commit as they really are (those still
        open, ``open_tasks`` being the coordinator's mirror), the unused ids closed."""
        issued_by = now + 2 * RESERVATION_SECONDS  # the latest any of them can go out, with room to publish
        reserved = {
            uuid.uuid4().hex: OpenTask(version=version, issued_at=issued_by, reserved=True)
            for _ in range(self.per_version)
        }
        self._unpublished.update(reserved)  # before the write: a lost reply leaves them in Redis
        return LedgerChanges(version, now, reserved, self._published_and_open(open_tasks), closed=list(self.unused))

    def settle(self, open_tasks: Mapping[str, OpenTask]) -> dict[str, OpenTask]:
        """The entries to rewrite now, as they really are, for the reserved tasks handed out since
        the last commit and still open: what a coordinator with nothing else to do writes, so that
        the ledger says exactly what is out (``fedq status``)."""
        published = self._published_and_open(open_tasks)
        self.published = set()
        return published

    def _published_and_open(self, open_tasks: Mapping[str, OpenTask]) -> dict[str, OpenTask]:
        """The reserved tasks handed out since the last commit that are still open, as they really are."""
        return {task_id: open_tasks[task_id] for task_id in self.published if task_id in open_tasks}

    def committed(self, changes: LedgerChanges) -> None:
        """The commit that wrote ``changes`` moved the head: its reservations are the ones to use."""
        self._unpublished.difference_update(changes.closed)
        self.version, self.reserved_at = changes.version, changes.reserved_at
        self.unused, self.published = list(changes.reserved), set()

    def abandon(self) -> list[str]:
        """Forget every id not handed out (the head moved elsewhere, the job ended, the
        connection was lost) and return them, for the caller to close in the ledger."""
        abandoned = sorted(self._unpublished)
        self._unpublished.clear()
        self.version, self.unused = None, []
        return abandoned
