"""Reading claim-checked deltas ahead: while the loop handles one update, a thread fetches and
hashes the deltas of the next ones the channel already holds.

A large model's update costs the loop a Redis read and a sha256 of megabytes before any of its
own work; both release the GIL, so they overlap with the loop's handling of the update before.
Only the I/O and the hash move: every check that depends on the coordinator's state (identity,
duplicate, open task, staleness, norms) still runs on the loop's thread, in delivery order, when
the update's turn comes. Reading a delta early changes nothing a later check could undo: the
first bytes read for a task are kept under a key no worker may write (common/store/blobs.py).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from fedq.broker.transport import Delivery
from fedq.common.store import ModelStore
from fedq.common.wire.limits import UPDATE_ENVELOPE_BYTES
from fedq.common.wire.messages import ClaimCheck, MessageError, ModelUpdate, parse_worker_message
from fedq.coordinator.service.validation import read_claimed_delta

# Deliveries taken from the channel before their turn. Each holds at most one delta in memory
# (at 10M parameters, 40 MB): two keep the reading thread busy while the loop works.
READ_AHEAD = 2


class DeltaReadAhead:
    def __init__(self, store: ModelStore, max_delta_bytes: int | None):
        self.store = store
        self.max_delta_bytes = max_delta_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedq-read-ahead")
        self._reads: dict[int, Future[tuple[bytes, str]]] = {}
        self.started = 0  # reads begun ahead, for tests and the curious

    def start(self, delivery: Delivery, worth_reading: Callable[[str], bool]) -> None:
        """Begin reading ``delivery``'s claim-checked delta if it has one and ``worth_reading(task_id)``
        (an open task with no update buffered: anything else is refused before its delta is read)."""
        if len(delivery.body) > UPDATE_ENVELOPE_BYTES or b'"inline"' in delivery.body:
            # A claim check is all envelope: this carries an inline delta (nothing to read) or is
            # hostile, and is parsed once, on its turn, after validation's size check. (Parsing
            # an inline delta here too, base64 and all, was 7-20 % of the loop at 10k parameters.)
            return
        try:
            update = parse_worker_message(delivery.body)
        except MessageError:
            return  # refused on its turn, with the reason
        if not (isinstance(update, ModelUpdate) and isinstance(update.delta, ClaimCheck)):
            return
        if not worth_reading(update.task_id):
            return
        self._reads[delivery.tag] = self._pool.submit(read_claimed_delta, update, self.store, self.max_delta_bytes)
        self.started += 1

    def result_for(self, delivery: Delivery) -> Future[tuple[bytes, str]] | None:
        """The read begun for ``delivery``, if any (it is handed over once)."""
        return self._reads.pop(delivery.tag, None)

    def forget(self) -> None:
        """Drop every read begun (a lost channel: its delivery tags mean nothing on the next one)."""
        self._reads.clear()

    def close(self) -> None:
        self.forget()
        self._pool.shutdown(wait=True, cancel_futures=True)
