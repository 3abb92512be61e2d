"""Which job this worker trains for, checked against the coordinator's signed description.

The task plugin is this worker's own: ``--task`` (a built-in name or
``module:object``) and ``--task-params`` from its flags, environment or job
file. Nothing read from Redis is imported: left unset, the worker accepts the
job's task only if it is one of fedq's built-in tasks, and adopts the job's
parameters, which are data. The description's public key verifies every round
task; a worker that pins the key's fingerprint (``--coordinator-key``) also
notices a description rewritten by anyone but the coordinator.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import torch

from fedq.common.obs.logs import kv
from fedq.common.store import ModelStore
from fedq.common.tasks import BUILTIN_TASKS, FederatedTask, TaskPluginError, load_task
from fedq.common.tasks.base import weights_of
from fedq.common.wire import codec
from fedq.common.wire.description import DescriptionError, JobDescription
from fedq.common.wire.signing import VerifyKey

log = logging.getLogger("fedq.worker")


class JobMismatchError(TaskPluginError):
    """This worker is configured for something other than what the job trains: a configuration error."""


class UnverifiableJobError(RuntimeError):
    """The job's description is missing or does not verify: tasks cannot be checked, so none is trained."""


@dataclass(frozen=True)
class BoundJob:
    """The job's description, verified, and this worker's plugin and model that match it."""

    description: JobDescription
    plugin: FederatedTask
    model: torch.nn.Module

    @property
    def verify_key(self) -> VerifyKey:
        return self.description.verify_key


def _flags(task: str, params: dict[str, Any]) -> str:
    return f"--task {task} --task-params '{json.dumps(params, sort_keys=True)}'"


class JobBinder:
    def __init__(
        self,
        store: ModelStore,
        task: str | None = None,
        task_params: dict[str, Any] | None = None,
        pinned_fingerprint: str | None = None,
    ):
        self.store = store
        self.task = task
        self.task_params = task_params
        self.pinned_fingerprint = pinned_fingerprint
        self._raw: bytes | None = None
        self._bound: BoundJob | None = None
        self._plugins: dict[str, tuple[FederatedTask, torch.nn.Module]] = {}
        self._warned_unpinned = False

    def current(self) -> BoundJob:
        """The job as its description says now; cached until the description changes.

        Raises :class:`UnverifiableJobError` when there is no description or it does not
        verify, :class:`JobMismatchError` when it is not what this worker is configured for.
        """
        raw = self.store.status.load_description_text()
        if raw is None:
            raise UnverifiableJobError(
                f"job {self.store.job!r} has no description in Redis yet (its coordinator writes it at start)"
            )
        if raw != self._raw:
            self._bound = self._bind(raw)
            self._raw = raw
        assert self._bound is not None  # bound whenever _raw is set
        return self._bound

    def _bind(self, raw: bytes) -> BoundJob:
        try:
            description = JobDescription.from_json(raw)
            description.verify(self.pinned_fingerprint)
        except DescriptionError as error:
            raise UnverifiableJobError(str(error)) from None
        if description.job != self.store.job:
            raise UnverifiableJobError(f"the description under job {self.store.job!r} names job {description.job!r}")
        if self.pinned_fingerprint is None and not self._warned_unpinned:
            self._warned_unpinned = True
            log.warning(
                kv(
                    "coordinator_key_unpinned",
                    job=self.store.job,
                    fingerprint=description.verify_key.fingerprint,
                    advice="pin it with --coordinator-key so that a rewritten job description is refused",
                )
            )
        plugin, model = self._plugin_for(description)
        specs = codec.tensor_specs(weights_of(model))
        if specs != description.tensors:
            raise JobMismatchError(
                f"this worker's model for task {description.task!r} has tensors {specs}, but job "
                f"{self.store.job!r} trains {description.tensors}: a different version of the "
                "task plugin?"
            )
        log.info(
            kv(
                "job_bound",
                job=self.store.job,
                task=description.task,
                digest=description.digest[:16],
                coordinator_key=description.verify_key.fingerprint[:16],
            )
        )
        return BoundJob(description, plugin, model)

    def _plugin_for(self, description: JobDescription) -> tuple[FederatedTask, torch.nn.Module]:
        if self.task is None and description.task not in BUILTIN_TASKS:
            raise JobMismatchError(
                f"job {self.store.job!r} trains task {description.task!r}, which is not built into fedq; give this "
                f"worker that plugin with {_flags(description.task, description.task_params)} "
                "(a worker never imports code named in Redis)"
            )
        task = self.task or description.task
        if task != description.task:
            raise JobMismatchError(
                f"this worker trains task {task!r}, but job {self.store.job!r} trains "
                f"{description.task!r}; start the worker with "
                f"{_flags(description.task, description.task_params)}"
            )
        params = description.task_params if self.task_params is None else self.task_params
        if params != description.task_params:
            raise JobMismatchError(
                f"this worker's task parameters {json.dumps(params, sort_keys=True)} are not job "
                f"{self.store.job!r}'s; start the worker with "
                f"{_flags(description.task, description.task_params)}"
            )
        key = json.dumps([task, params], sort_keys=True)
        if key not in self._plugins:
            plugin = load_task(task, params)
            self._plugins[key] = (plugin, plugin.build_model())
        return self._plugins[key]
