"""The README's first command ends in `fedq demo`: it must train to its target and say so."""
from __future__ import annotations

import subprocess
import sys

from tests.support import AMQP_URL, REDIS_URL, ROOT


def test_the_demo_reaches_its_target_and_prints_a_summary(job, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "fedq.common.cli", "demo", "--job", job, "--amqp-url", AMQP_URL,
         "--redis-url", REDIS_URL, "--workers", "2", "--target", "0.85", "--log-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    summary = result.stdout.split("\nsummary\n", 1)[1]
    assert "stopped because      target_reached" in summary
    accuracy = float(summary.split("final accuracy", 1)[1].split()[0])
    assert accuracy >= 0.85
