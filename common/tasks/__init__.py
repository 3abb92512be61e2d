"""Task plugins: the model, each worker's local data, local training and evaluation.

A plugin is named by a Python path ``module:object`` (``object`` is a
:class:`FederatedTask` subclass or a factory returning one, called with the
job's task parameters) or by the short name of a built-in task.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedq.common.tasks.base import FederatedTask, LocalData, TaskPluginError, load_weights_into, weights_of

BUILTIN_TASKS = {
    "digits": "fedq.common.tasks.digits:DigitsTask",
    "digits28": "fedq.common.tasks.digits:Digits28Task",
    "synthetic": "fedq.common.tasks.synthetic:SyntheticTask",
    "linear": "fedq.common.tasks.linear:LinearRegressionTask",
    "images": "fedq.common.tasks.images:SyntheticImagesTask",
}


def load_task(name: str, params: dict[str, Any] | None = None) -> FederatedTask:
    """Instantiate the task plugin ``name`` with ``params``; errors are one sentence."""
    path = BUILTIN_TASKS.get(name, name)
    module_name, _, object_name = path.partition(":")
    if not module_name or not object_name:
        raise TaskPluginError(f"task {name!r} is neither a built-in ({', '.join(BUILTIN_TASKS)}) nor 'module:object'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise TaskPluginError(f"cannot import task module {module_name!r}: {error}") from None
    factory = getattr(module, object_name, None)
    if factory is None:
        raise TaskPluginError(f"module {module_name!r} has no {object_name!r}")
    try:
        task = factory(**(params or {}))
    except (TypeError, ValueError) as error:
        raise TaskPluginError(f"task {name!r} does not accept parameters {params}: {error}") from None
    if not isinstance(task, FederatedTask):
        raise TaskPluginError(f"{path} did not produce a FederatedTask")
    return task


__all__ = [
    "BUILTIN_TASKS",
    "FederatedTask",
    "LocalData",
    "TaskPluginError",
    "load_task",
    "load_weights_into",
    "weights_of",
]
