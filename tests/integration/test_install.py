"""A regular install carries one import root, `fedq`, and nothing named `common` or `worker`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.support import ROOT


def test_the_wheel_holds_only_fedq_and_its_metadata(tmp_path):
    source = tmp_path / "source"
    for folder in ("common", "broker", "coordinator", "worker"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(tmp_path / "dist"),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("fedq-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"fedq", "fedq-0.1.0.dist-info"}
    packages = {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")}
    assert {"fedq/common/store", "fedq/common/wire", "fedq/coordinator/algorithms", "fedq/worker"} <= packages
