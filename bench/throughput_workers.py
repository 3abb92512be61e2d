"""The fake workers of ``throughput.py``: threads that answer every task at once with an all-zeros delta.

The delta (``ZeroDelta``, also used by ``scale_workers.py``) is encoded exactly as
``fedq.worker.training`` encodes one: inline when the safetensors payload is <= 256 KiB, else
SET in Redis first and sent as a claim check (key, sha256, nbytes). Each update is published
with publisher confirms before its task is acked.
"""

from __future__ import annotations

import threading

import numpy as np
import pika.exceptions

from fedq.broker.connection import connect
from fedq.broker.publisher import publish
from fedq.broker.topology import Topology
from fedq.common.store import ModelStore
from fedq.common.wire import codec
from fedq.common.wire.limits import INLINE_LIMIT_BYTES, UPDATE_BLOB_TTL_SECONDS
from fedq.common.wire.messages import ClaimCheck, InlineDelta, ModelUpdate, RoundTask, parse_task


class ZeroDelta:
    """An all-zeros delta of the model, encoded once; ``update`` answers a task with it."""

    def __init__(self, weights: codec.Weights):
        self.payload = codec.encode({name: np.zeros_like(array) for name, array in weights.items()})
        self.inline = len(self.payload) <= INLINE_LIMIT_BYTES
        self.sha256 = codec.digest(self.payload)

    def update(self, store: ModelStore, task: RoundTask, worker_id: str, train_seconds: float = 0.0) -> ModelUpdate:
        """The update ``worker_id`` sends for ``task``; a claim-checked delta is in Redis when this returns."""
        if self.inline:
            carried: InlineDelta | ClaimCheck = InlineDelta(self.payload)
        else:
            # As fedq.worker.training: the blob is in Redis before the message naming it exists.
            key = store.blobs.put(task.task_id, worker_id, self.payload, UPDATE_BLOB_TTL_SECONDS)
            carried = ClaimCheck(key=key, sha256=self.sha256, nbytes=len(self.payload))
        return ModelUpdate(
            job=task.job,
            task_id=task.task_id,
            worker_id=worker_id,
            base_version=task.model_version,
            num_examples=8,
            delta=carried,
            train_seconds=train_seconds,
        )


class FakeWorkers:
    """Threads that answer each task immediately with a precomputed all-zeros delta."""

    def __init__(self, job: str, amqp_url: str, redis_url: str, delta: ZeroDelta, threads: int, prefetch: int):
        self.job, self.amqp_url, self.redis_url = job, amqp_url, redis_url
        self.topology = Topology(job)
        self.prefetch = prefetch
        self.delta = delta
        self.stop = threading.Event()
        self.ready = threading.Barrier(threads + 1)
        self.done = [0] * threads
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._run, args=(index,), name=f"fake-worker-{index}", daemon=True)
            for index in range(threads)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        self.ready.wait(timeout=30)

    def close(self) -> int:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)
        return sum(self.done)

    def _run(self, index: int) -> None:
        worker_id = f"bench-{index}"
        connection = None
        try:
            store = ModelStore.open(self.redis_url, self.job)
            connection = connect(self.amqp_url, name=f"fedq-bench-{worker_id}")
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_qos(prefetch_count=self.prefetch)
            self.ready.wait(timeout=30)
            for method, _properties, body in channel.consume(self.topology.tasks, inactivity_timeout=0.1):
                if self.stop.is_set():
                    break
                if method is None:
                    continue
                update = self.delta.update(store, parse_task(body), worker_id)
                publish(channel, self.topology.updates, update.to_bytes(), message_id=update.task_id)
                channel.basic_ack(method.delivery_tag)
                self.done[index] += 1
            channel.cancel()
        except (
            pika.exceptions.ChannelClosed,
            pika.exceptions.ConnectionClosed,
            pika.exceptions.StreamLostError,
        ) as error:
            if not self.stop.is_set():
                self.errors.append(error)
        except BaseException as error:  # reported by the main thread
            self.errors.append(error)
            try:
                self.ready.abort()
            except threading.BrokenBarrierError:
                pass
        finally:
            if connection is not None and connection.is_open:
                try:
                    connection.close()
                except Exception:
                    pass
