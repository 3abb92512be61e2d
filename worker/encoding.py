"""How a worker turns its trained delta into the update it sends: local differential privacy,
error feedback and the job's compression, in that order.

1. *Local DP* (the task's ``dp_clip`` and ``dp_noise``): the delta is scaled to an L2 norm of at
   most ``dp_clip`` and Gaussian noise of standard deviation ``dp_noise * dp_clip`` is added to
   every value, so that what leaves the worker is private whoever reads it (the coordinator, the
   history, another participant). The noise comes from a generator seeded from the operating
   system's entropy; it is never recorded.
2. *Error feedback* (the task's ``error_feedback``): what the compression dropped last time (the
   residual) is added before compressing, and what it drops now becomes the next residual, so
   nothing is lost for good, only late (Stich et al. 2018; Karimireddy et al. 2019). Asynchrony
   amplifies compression error, and error feedback is what restores convergence (arXiv
   2504.19903). The residual is post-processing of the noised delta: it costs no privacy.
3. *Compression* (common/wire/compression.py).

The residual is this worker's own state: kept in memory and in a file under ``state_dir``, named
after the job and the worker id, so a worker restarted with the same ``--worker-id`` carries
on with it. It is written only once the broker confirmed the update that produced it
(:meth:`UpdateEncoder.sent`): a worker that dies before then retrains its task from the
residual it had, and nothing is counted twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedq.common.obs.logs import kv
from fedq.common.tensors import clip_by_norm
from fedq.common.wire import codec
from fedq.common.wire.codec import Weights
from fedq.common.wire.compression import Compression
from fedq.common.wire.messages import RoundTask

log = logging.getLogger("fedq.worker")


def default_state_dir() -> Path:
    """Where workers keep their state when --state-dir is not given: $XDG_STATE_HOME/fedq or ~/.local/state/fedq."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "fedq"


def clip_and_noise(delta: Weights, clip: float, noise_multiplier: float, rng: np.random.Generator) -> Weights:
    """The Gaussian mechanism on one update: L2 norm clipped to ``clip`` (as the coordinator's
    aggregation clips), N(0, (noise * clip)^2) added to every value."""
    return {
        name: array + rng.normal(0.0, noise_multiplier * clip, array.shape).astype(np.float32)
        for name, array in clip_by_norm(delta, clip).items()
    }


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:80]


@dataclass
class _Pending:
    task_id: str
    residual: Weights | None


class UpdateEncoder:
    """Encodes each task's delta as the task asks; keeps this worker's error-feedback residual."""

    def __init__(self, job: str, worker_id: str, state_dir: Path | None = None):
        self.job = job
        self.worker_id = worker_id
        self.state_dir = state_dir or default_state_dir()
        self._residual: Weights | None = None
        self._residual_loaded = False
        self._pending: _Pending | None = None
        self._rng = np.random.default_rng(secrets.randbits(128))

    @property
    def residual_path(self) -> Path:
        # Worker ids may hold characters a file name may not: keep the readable part, add a hash.
        unique = hashlib.sha256(f"{self.job}\0{self.worker_id}".encode()).hexdigest()[:12]
        return self.state_dir / _file_name(self.job) / f"{_file_name(self.worker_id)}-{unique}.residual"

    def encode(self, task: RoundTask, delta: Weights) -> tuple[bytes, str]:
        """(payload, its encoding's spec) for ``delta``; the new residual waits for :meth:`sent`."""
        compression = Compression.parse(task.compression)
        if task.dp_clip > 0:
            delta = clip_and_noise(delta, task.dp_clip, task.dp_noise, self._rng)
        residual = self._load_residual(delta) if task.error_feedback and compression.lossy else None
        if residual is not None:
            delta = {name: (array + residual[name]).astype(np.float32, copy=False) for name, array in delta.items()}
        if not compression.lossy:
            self._pending = None
            return compression.encode(delta), compression.spec
        payload, decoded = compression.roundtrip(delta)
        kept = {name: array - decoded[name] for name, array in delta.items()} if task.error_feedback else None
        self._pending = _Pending(task.task_id, kept)
        return payload, compression.spec

    def sent(self, task_id: str) -> None:
        """The broker confirmed the update of ``task_id``: its residual becomes this worker's."""
        pending, self._pending = self._pending, None
        if pending is None or pending.task_id != task_id or pending.residual is None:
            return
        self._residual = pending.residual
        path = self.residual_path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(".tmp")
            with open(staging, "wb") as file:
                file.write(codec.encode(pending.residual))
                file.flush()
                os.fsync(file.fileno())
            os.replace(staging, path)
        except OSError as error:
            # Kept in memory all the same: only a restart of this worker would lose it.
            log.warning(kv("residual_not_saved", worker=self.worker_id, path=str(path), error=str(error)))

    def _load_residual(self, delta: Weights) -> Weights | None:
        if not self._residual_loaded:
            self._residual_loaded = True
            try:
                self._residual = codec.decode(self.residual_path.read_bytes())
                log.info(kv("residual_loaded", worker=self.worker_id, path=str(self.residual_path)))
            except FileNotFoundError:
                pass
            except (OSError, codec.CodecError) as error:
                log.warning(
                    kv("residual_unreadable", worker=self.worker_id, path=str(self.residual_path), error=str(error))
                )
        if self._residual is not None and codec.tensor_specs(self._residual) != codec.tensor_specs(delta):
            log.warning(kv("residual_dropped", worker=self.worker_id, detail="it does not fit the job's model"))
            self._residual = None
        return self._residual
