"""The distribution installs one import root, ``fedq``, mapped onto the user's folders."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("common", "broker", "coordinator", "worker")


def setuptools_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_folder_with_code_is_a_listed_package():
    listed = set(setuptools_table()["packages"])
    on_disk = {
        "fedq." + ".".join(path.parent.relative_to(ROOT).parts)
        for folder in FOLDERS
        for path in (ROOT / folder).rglob("*.py")
    }
    assert on_disk == listed, f"missing from pyproject: {sorted(on_disk - listed)}; stale: {sorted(listed - on_disk)}"
    for package in listed:
        folder = ROOT.joinpath(*package.split(".")[1:])
        assert (folder / "__init__.py").exists(), f"{folder} needs an __init__.py"


def test_the_folders_are_mapped_under_fedq():
    assert setuptools_table()["package-dir"] == {f"fedq.{folder}": folder for folder in FOLDERS}


def test_a_users_own_common_package_coexists(tmp_path):
    """Task plugins often live next to a package named ``common``; neither may shadow the other."""
    import subprocess
    import sys

    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "__init__.py").write_text("WHOSE = 'the user'\n")
    code = "import common, fedq.common.settings as s; print(common.WHOSE, s.DEFAULT_REDIS_URL)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["the", "user", "redis://localhost:6379/0"]
