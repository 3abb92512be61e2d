"""The math of aggregation is pure: it imports no broker, store or service, and changes no global state."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, sys, warnings
import torch
threads, filters = torch.get_num_threads(), list(warnings.filters)
import fedq.coordinator.algorithms.step, fedq.coordinator.algorithms.registry
import fedq.coordinator.algorithms.aggregation, fedq.coordinator.algorithms.server_optimizers
import fedq.coordinator.algorithms.staleness
print(json.dumps({
    "modules": sorted(name for name in sys.modules
                      if name.split(".")[0] in ("pika", "redis", "fakeredis")
                      or name.startswith(("fedq.broker", "fedq.common.store", "fedq.coordinator.service",
                                          "fedq.coordinator.ops", "fedq.worker"))),
    "threads_changed": torch.get_num_threads() != threads,
    "filters_changed": list(warnings.filters) != filters,
}))
"""


def test_importing_the_math_imports_no_io_and_changes_no_global_state():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == {"modules": [], "threads_changed": False, "filters_changed": False}


def test_the_wire_module_imports_no_torch():
    probe = (
        "import sys, fedq.common.wire.messages, fedq.common.wire.codec, fedq.common.wire.limits; "
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
