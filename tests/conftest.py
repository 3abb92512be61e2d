"""Settings every test shares."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _archive_default_in_a_temporary_folder(tmp_path_factory):
    """The coordinator's default archive is under $XDG_DATA_HOME: keep the tests' (and their
    subprocesses') archives out of the real home folder."""
    import os

    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("xdg-data"))
    yield
