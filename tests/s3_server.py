"""A private S3-compatible server (moto in server mode) on loopback, for tests of the history archive.

:class:`PrivateS3` starts ``python -m moto.server -H 127.0.0.1 -p <free port>`` as
a separate process in a session of its own (so a test may :meth:`~PrivateS3.kill`
it to simulate an outage), waits until it answers HTTP (polling, with a generous
deadline; it usually answers within half a second), creates a bucket and offers:

* ``endpoint_url`` - ``http://127.0.0.1:<port>``;
* ``bucket`` - the bucket's name (made at start);
* ``url(prefix="")`` - ``"s3://<bucket>/<prefix>"``;
* ``storage_options`` - the keyword arguments for fsspec
  (``fsspec.open(url, **storage_options)``, ``fsspec.filesystem("s3", **storage_options)``,
  ``fsspec.url_to_fs(url, **storage_options)``): dummy ``key``/``secret`` and
  ``client_kwargs={"endpoint_url": ...}``;
  deliberately no ``region_name`` (botocore signs for ``us-east-1`` then; see
  below why a region there breaks ``fs.mkdir(bucket)``);
* ``env`` - environment variables that make a plain ``fsspec.open("s3://...")``
  with no storage options reach this server (for a child process, e.g. a fedq
  coordinator given only an ``s3://`` URL): ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL``;
* ``child_environment(**extra)`` - ``os.environ`` without any ``AWS_*`` or
  ``FSSPEC_S3*`` variable of the caller, plus ``env`` and ``extra``: what to pass
  as ``env=`` to ``subprocess``;
* ``filesystem()`` - a fresh (uncached) ``s3fs.S3FileSystem`` on this server;
* ``stop()`` (SIGTERM, then SIGKILL), ``kill()`` (SIGKILL at once), ``running``.

The fixture ``s3_archive_server`` (module scope; import it into a test module)
yields a started :class:`PrivateS3` and stops it afterwards.

How the environment route reaches the endpoint (checked with fsspec/s3fs
2026.9.0, aiobotocore 3.10.0, botocore 1.43.117):

* ``AWS_ENDPOINT_URL`` works: s3fs passes no ``endpoint_url`` of its own when
  none is given, and botocore (which aiobotocore builds on) reads the endpoint
  from its configuration chain, environment first. That support came with
  botocore 1.31 ("service-specific endpoints"); ``AWS_ENDPOINT_URL_S3`` works
  too, and wins over ``AWS_ENDPOINT_URL`` for S3 alone. Both are ignored when
  ``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS=true`` is set, and an ``AWS_PROFILE``
  naming a profile that doesn't exist breaks every client: hence
  :meth:`PrivateS3.child_environment` drops the caller's ``AWS_*`` variables.
* fsspec's own configuration works as well, independent of botocore:
  ``FSSPEC_S3_ENDPOINT_URL=<url>`` (any ``FSSPEC_<PROTOCOL>_<KWARG>`` becomes a
  default keyword argument of that filesystem) or
  ``FSSPEC_S3='{"client_kwargs": {"endpoint_url": "<url>"}}'`` (JSON). fsspec
  reads these once, when it is imported.
* With the endpoint at ``127.0.0.1`` (an IP address), botocore uses path-style
  addressing (``http://127.0.0.1:<port>/<bucket>/<key>``), which moto serves;
  no ``addressing_style`` setting is needed.
* Credentials must be present (any value: moto checks no signatures), else
  botocore fails with ``NoCredentialsError`` before sending anything.
* ``s3fs``'s ``mkdir(bucket)`` sends ``LocationConstraint=<region_name>`` when
  ``client_kwargs`` (or its own kwargs) name a region, and S3 - moto like AWS -
  rejects ``us-east-1`` there ("The specified location-constraint is not
  valid"): so the storage options name no region. ``AWS_DEFAULT_REGION`` in the
  environment does not have that effect (s3fs reads only its own arguments).

Pass byte ranges by keyword: ``fs.cat_file(path, start=a, end=b)``. s3fs's
``cat_file`` is ``(path, version_id=None, start=None, end=None)``, so
``fs.cat_file(path, a, b)`` sends ``a`` as a version id (botocore rejects the
int) - unlike fsspec's base and local filesystems, where it is ``(path, start, end)``.

moto keeps everything in memory: stopping the server loses the bucket. Every
server process carries ``FEDQ_PRIVATE_SERVER=<id>`` in its environment, as the
servers of :mod:`tests.private_servers` do, and :meth:`PrivateS3.stop` ends the
server's session and any process still carrying the id, nothing else.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.private_servers import MARKER, _kill_everything_of, _listens, _Server, free_port

#: How long moto may take to answer: about 0.5 s on a quiet machine; far longer on a busy one.
STARTUP_TIMEOUT = float(os.environ.get("FEDQ_TEST_SERVER_STARTUP_TIMEOUT", "600"))
REGION = "us-east-1"
#: Dummy credentials: moto accepts any, botocore insists on some.
ACCESS_KEY = "fedq-test-access-key"
SECRET_KEY = "fedq-test-secret-key"


class PrivateS3(_Server):
    """A moto S3 server on 127.0.0.1 with one bucket, for this test process alone (see the module doc)."""

    def __init__(
        self, directory: str | os.PathLike | None = None, *, bucket: str | None = None, host: str = "127.0.0.1"
    ):
        # Holds moto's log (``moto.log``); a temporary one, removed at stop, unless the caller gives one.
        self._own_directory = directory is None
        self.directory = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="fedq-s3-"))
        self.directory.mkdir(parents=True, exist_ok=True)
        self.bucket = bucket or f"fedq-archive-{secrets.token_hex(4)}"
        self.host = host
        self.port: int | None = None
        self.tag = f"s3-{secrets.token_hex(6)}"
        self.log = self.directory / "moto.log"
        self.startup_seconds: float | None = None
        self._process: subprocess.Popen | None = None

    # -- public API ---------------------------------------------------------------------------------

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the S3 server is not started")
        return f"http://{self.host}:{self.port}"

    def url(self, prefix: str = "") -> str:
        """``s3://<bucket>/<prefix>`` (``prefix`` without a leading slash)."""
        return f"s3://{self.bucket}/{prefix.lstrip('/')}"

    @property
    def storage_options(self) -> dict:
        """Keyword arguments for fsspec to reach this server: ``fsspec.open(url, **storage_options)``."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"endpoint_url": self.endpoint_url}}

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that make a plain ``fsspec.open("s3://...")`` reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
        }

    def child_environment(self, **extra: str) -> dict[str, str]:
        """``os.environ`` less the caller's ``AWS_*``/``FSSPEC_S3*`` variables, plus :attr:`env` and ``extra``."""
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AWS_", "FSSPEC_S3")) and key != MARKER
        }
        environment.update(self.env)
        environment.update(extra)
        return environment

    def filesystem(self):
        """A new ``s3fs.S3FileSystem`` on this server (not fsspec's cached instance)."""
        import fsspec

        return fsspec.filesystem("s3", skip_instance_cache=True, **self.storage_options)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- life cycle ---------------------------------------------------------------------------------

    def start(self) -> PrivateS3:
        if self.running:
            return self
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            self.port = free_port(self.host)
            began = time.monotonic()
            self._spawn()
            try:
                self._await_startup(deadline)
            except _PortTaken:
                self._stop_process(grace=5)
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"moto found no free port before the deadline:\n{self._tail(self.log)}"
                    ) from None
                continue
            except BaseException:
                self.stop()
                raise
            self.startup_seconds = time.monotonic() - began
            break
        try:
            self._create_bucket()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 10) -> None:
        """SIGTERM the server (its whole session and anything tagged with its id), SIGKILL after ``grace``."""
        self._stop_process(grace)
        _Server._live.discard(self)
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self) -> None:
        """SIGKILL the server at once (an outage: the bucket and its objects are gone)."""
        self._stop_process(grace=0)
        _Server._live.discard(self)

    # -- internals ----------------------------------------------------------------------------------

    def _spawn(self) -> None:
        environment = {
            key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MOTO_")) and key != MARKER
        }
        environment[MARKER] = self.tag
        environment["PYTHONUNBUFFERED"] = "1"
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=self.directory,
                start_new_session=True,
            )
        _Server._live.add(self)

    def _await_startup(self, deadline: float) -> None:
        probe = f"{self.endpoint_url}/moto-api/"
        delay = 0.02
        while True:
            if self._process.poll() is not None:
                tail = self._tail(self.log)
                if "Address already in use" in tail:
                    raise _PortTaken(self.port)
                raise RuntimeError(f"moto_server exited with {self._process.returncode}:\n{tail}")
            # Only a server that is ours: another process could have taken the port meanwhile.
            if _listens(self._process.pid, self.port):
                try:
                    with urllib.request.urlopen(probe, timeout=5) as response:
                        if response.status == 200:
                            return
                except (urllib.error.URLError, OSError):
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"moto_server did not answer on {self.endpoint_url} within "
                    f"{STARTUP_TIMEOUT:.0f} s:\n{self._tail(self.log)}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.5)

    def _create_bucket(self) -> None:
        self.filesystem().mkdir(self.bucket)

    def _stop_process(self, grace: float) -> None:
        _kill_everything_of(self.tag, self._process, grace)


class _PortTaken(RuntimeError):
    """moto could not bind its port (another process took it after we chose it)."""


@pytest.fixture(scope="module")
def s3_archive_server(tmp_path_factory) -> PrivateS3:
    """A started :class:`PrivateS3` with one empty bucket, stopped after the module's tests."""
    server = PrivateS3(tmp_path_factory.mktemp("s3"))
    server.start()
    yield server
    server.stop()
