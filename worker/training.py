"""One task's local training, and packing its result as an update (inline or claim check).

Runs in the worker's training thread: nothing here touches the broker.
"""
from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import torch

from fedq.common.store import ModelStore
from fedq.common.tasks import FederatedTask, load_weights_into, weights_of
from fedq.common.wire import codec
from fedq.common.wire.limits import INLINE_LIMIT_BYTES, UPDATE_BLOB_TTL_SECONDS
from fedq.common.wire.messages import ClaimCheck, InlineDelta, ModelUpdate, RoundTask
from fedq.worker.job import BoundJob


def stable_partition(worker_id: str) -> int:
    """Stable across restarts of the same --worker-id; the plugin takes it modulo its partitions."""
    return zlib.crc32(worker_id.encode())


class LocalTrainer:
    """Trains the job's model on this worker's data partition, one task at a time."""

    def __init__(self, store: ModelStore, worker_id: str, partition: int, *, slowdown_seconds: float = 0.0,
                 inline_limit_bytes: int = INLINE_LIMIT_BYTES):
        self.store = store
        self.worker_id = worker_id
        self.partition = partition
        self.slowdown_seconds = slowdown_seconds
        self.inline_limit_bytes = inline_limit_bytes
        self._one_at_a_time = threading.Lock()

    def train(self, task: RoundTask, job: BoundJob) -> ModelUpdate:
        """Train ``task`` and pack its update. One call at a time: a training abandoned by a lost
        connection may still be running when the next task (or the same one, redelivered)
        starts, and two trainings of one torch module corrupt each other (autograd errors,
        segmentation faults). The later call waits; the abandoned one's result is discarded
        by its caller, which is gone."""
        with self._one_at_a_time:
            return self._train(task, job.plugin, job.model)

    def _train(self, task: RoundTask, plugin: FederatedTask, model: torch.nn.Module) -> ModelUpdate:
        # Verified against the digest the coordinator signed into the task, not only the one in
        # Redis: weights and metadata rewritten together are refused all the same.
        base = self.store.versions.load_weights(task.model_version, expected_digest=task.model_digest)
        started = time.monotonic()
        load_weights_into(model, base)
        data = plugin.local_data(self.partition)
        metrics = plugin.train(model, data, task.train)
        if self.slowdown_seconds:
            time.sleep(self.slowdown_seconds)
        trained = weights_of(model)
        delta = {name: (trained[name] - base[name]).astype(np.float32, copy=False) for name in base}
        return ModelUpdate(job=task.job, task_id=task.task_id, worker_id=self.worker_id,
                           base_version=task.model_version, num_examples=len(data), delta=self.pack(task, delta),
                           metrics=metrics, train_seconds=time.monotonic() - started)

    def pack(self, task: RoundTask, delta: codec.Weights) -> InlineDelta | ClaimCheck:
        payload = codec.encode(delta)
        if len(payload) <= self.inline_limit_bytes:
            return InlineDelta(payload)
        # Claim check: the blob is in Redis before the message that names it exists.
        key = self.store.blobs.put(task.task_id, self.worker_id, payload, UPDATE_BLOB_TTL_SECONDS)
        return ClaimCheck(key=key, sha256=codec.digest(payload), nbytes=len(payload))
