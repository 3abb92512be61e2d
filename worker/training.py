"""One task's local training, and packing its result as an update (inline or claim check).

Runs in the worker's training thread: nothing here touches the broker.
"""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import torch

from fedq.common.obs import metrics as metrics_module
from fedq.common.store import ModelStore
from fedq.common.tasks import FederatedTask, TaskPluginError, load_weights_into, weights_of
from fedq.common.tasks.base import LOCAL_STEPS, LocalData
from fedq.common.wire import codec
from fedq.common.wire.limits import INLINE_LIMIT_BYTES, UPDATE_BLOB_TTL_SECONDS
from fedq.common.wire.messages import MAX_LOCAL_STEPS, ClaimCheck, InlineDelta, ModelUpdate, RoundTask
from fedq.worker.encoding import UpdateEncoder
from fedq.worker.job import BoundJob
from fedq.worker.model_cache import HeldVersions

CPU = torch.device("cpu")  # the default device: training needs no accelerator


def stable_partition(worker_id: str) -> int:
    """Stable across restarts of the same --worker-id; the plugin takes it modulo its partitions."""
    return zlib.crc32(worker_id.encode())


def job_partitions(job: BoundJob) -> int:
    return max(1, int(job.plugin.num_partitions))


def training_device(spec: str) -> torch.device:
    """The torch device ``spec`` names, checked now: a worker told to use a GPU it lacks says so at start."""
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise TaskPluginError(f"--device {spec!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise TaskPluginError(
            f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s) that "
            "torch can use; train on --device cpu"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TaskPluginError("--device mps: the MPS backend is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise TaskPluginError(f"--device {spec!r}: fedq trains on cpu, cuda or mps")
    return device


class LocalTrainer:
    """Trains the job's model on this worker's data, one task at a time.

    The data is a partition of the task's split, or (``data_location``, from --data) whatever the
    plugin's ``local_data_at`` reads there, checked once against the model.
    """

    def __init__(
        self,
        store: ModelStore,
        worker_id: str,
        *,
        device: torch.device = CPU,
        data_location: str | None = None,
        slowdown_seconds: float = 0.0,
        step_delay_seconds: float = 0.0,
        inline_limit_bytes: int = INLINE_LIMIT_BYTES,
        encoder: UpdateEncoder | None = None,
    ):
        self.store = store
        self.encoder = encoder or UpdateEncoder(store.keys.job, worker_id)
        # The versions this worker trained from last: the next one is read as diffs from them when
        # the coordinator publishes diffs and they are smaller (worker/model_cache.py).
        self.held = HeldVersions(store.versions)
        self.last_read: tuple[str, int] = ("none", 0)  # how the last task's version was read, and its bytes
        self.worker_id = worker_id
        self.device = device
        self.data_location = data_location
        self.slowdown_seconds = slowdown_seconds  # simulated: a slow link, once per task
        self.step_delay_seconds = step_delay_seconds  # simulated: a slow device, every forward pass
        self.inline_limit_bytes = inline_limit_bytes
        self._one_at_a_time = threading.Lock()
        self._located: dict[int, LocalData] = {}  # id(plugin) -> the data read from data_location

    def train(self, task: RoundTask, job: BoundJob, partition: int | None) -> ModelUpdate:
        """Train ``task`` and pack its update. One call at a time: a training abandoned by a lost
        connection may still be running when the next task (or the same one, redelivered)
        starts, and two trainings of one torch module corrupt each other (autograd errors,
        segmentation faults). The later call waits; the abandoned one's result is discarded
        by its caller, which is gone."""
        with self._one_at_a_time:
            return self._train(task, job.plugin, job.model, partition)

    def data(self, plugin: FederatedTask, model: torch.nn.Module, partition: int | None) -> LocalData:
        if self.data_location is None:
            assert partition is not None  # only a worker with --data has no partition
            return plugin.local_data(partition)
        if id(plugin) not in self._located:
            data = plugin.local_data_at(self.data_location)
            try:
                with torch.no_grad():
                    model(data.features[:1])
            except Exception as error:  # noqa: BLE001 - any failure means the data does not fit the model
                raise TaskPluginError(
                    f"the data at {self.data_location} does not fit the job's model ({type(error).__name__}: {error})"
                ) from None
            self._located[id(plugin)] = data
        return self._located[id(plugin)]

    def _train(
        self, task: RoundTask, plugin: FederatedTask, model: torch.nn.Module, partition: int | None
    ) -> ModelUpdate:
        # Verified against the digest the coordinator signed into the task, not only the one in
        # Redis: weights and metadata rewritten together are refused all the same.
        loaded = self.held.load_counted(task.model_version, task.model_digest)
        base = loaded.weights
        metrics_module.WORKER_BYTES_RECEIVED.labels(task.job, loaded.source).inc(loaded.bytes_read)
        self.last_read = (loaded.source, loaded.bytes_read)
        started = time.monotonic()
        load_weights_into(model.cpu(), base)
        data = self.data(plugin, model, partition)
        if self.device.type != "cpu":  # weights_of below copies the trained weights back
            model.to(self.device)
            data = LocalData(data.features.to(self.device), data.targets.to(self.device))
        slower = (
            model.register_forward_pre_hook(lambda *_: time.sleep(self.step_delay_seconds))
            if self.step_delay_seconds
            else None
        )
        try:
            metrics = dict(plugin.train(model, data, task.train))
        finally:
            if slower is not None:
                slower.remove()
        if self.slowdown_seconds:
            time.sleep(self.slowdown_seconds)
        steps = metrics.pop(LOCAL_STEPS, 0)
        local_steps = int(steps) if isinstance(steps, (int, float)) and 0 <= steps <= MAX_LOCAL_STEPS else 0
        trained = weights_of(model)
        delta = {name: (trained[name] - base[name]).astype(np.float32, copy=False) for name in base}
        payload, encoding = self.encoder.encode(task, delta)
        return ModelUpdate(
            job=task.job,
            task_id=task.task_id,
            worker_id=self.worker_id,
            base_version=task.model_version,
            num_examples=len(data),
            delta=self.pack(task, payload),
            # Local DP noises the delta, not the training loss or accuracy on this worker's data:
            # those would leak what the noise protects, so they stay here.
            metrics={} if task.dp_clip > 0 else metrics,
            train_seconds=time.monotonic() - started,
            local_steps=local_steps,
            encoding=encoding,
        )

    def pack(self, task: RoundTask, payload: bytes) -> InlineDelta | ClaimCheck:
        """The encoded delta inline, when small enough, or else written to Redis under its claim check."""
        if len(payload) <= self.inline_limit_bytes:
            return InlineDelta(payload)
        # Claim check: the blob is in Redis before the message that names it exists.
        key = self.store.blobs.put(task.task_id, self.worker_id, payload, UPDATE_BLOB_TTL_SECONDS)
        return ClaimCheck(key=key, sha256=codec.digest(payload), nbytes=len(payload))
