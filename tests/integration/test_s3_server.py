"""The private S3 server of tests/s3_server.py serves fsspec, by storage options and by environment alone."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.s3_server import s3_archive_server  # noqa: F401  (fixture)
from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SIZE = 5 * 1024 * 1024


def payload() -> bytes:
    """5 MiB of bytes that differ everywhere, so a wrong range can't pass by chance."""
    block = hashlib.sha256(b"fedq").digest()
    chunks = []
    for _ in range(SIZE // len(block)):
        block = hashlib.sha256(block).digest()
        chunks.append(block)
    return b"".join(chunks)


def test_storage_options_write_range_read_list_delete(s3_archive_server):  # noqa: F811
    import fsspec

    server = s3_archive_server
    data = payload()
    url = server.url("direct/rounds/round-000001.bin")
    with fsspec.open(url, "wb", **server.storage_options) as handle:  # a multipart upload at 5 MiB
        handle.write(data)

    fs, path = fsspec.url_to_fs(url, **server.storage_options)
    assert path == f"{server.bucket}/direct/rounds/round-000001.bin"
    assert fs.size(path) == SIZE
    start, end = 3 * 1024 * 1024 + 17, 4 * 1024 * 1024 + 5
    assert fs.cat_file(path, start=start, end=end) == data[start:end]
    assert fs.cat_file(path, start=SIZE - 10) == data[-10:]

    fs.pipe_file(f"{server.bucket}/direct/rounds/round-000002.bin", b"second")
    fs.invalidate_cache()
    assert fs.ls(f"{server.bucket}/direct/rounds", detail=False) == [
        f"{server.bucket}/direct/rounds/round-000001.bin",
        f"{server.bucket}/direct/rounds/round-000002.bin",
    ]
    assert fs.find(server.url("direct")) == fs.ls(f"{server.bucket}/direct/rounds", detail=False)

    fs.rm(path)
    fs.invalidate_cache()
    assert not fs.exists(path)
    assert fs.ls(f"{server.bucket}/direct/rounds", detail=False) == [f"{server.bucket}/direct/rounds/round-000002.bin"]
    fs.rm(server.url("direct"), recursive=True)
    fs.invalidate_cache()
    assert fs.find(server.url("direct")) == []


CHILD = textwrap.dedent("""
    import json, sys
    import fsspec

    url = sys.argv[1]
    fs, path = fsspec.url_to_fs(url)  # no storage options: only the environment says where S3 is
    data = sys.stdin.buffer.read()
    with fsspec.open(url, "wb") as handle:
        handle.write(data)
    parent = path.rsplit("/", 1)[0]
    listed = fs.ls(parent, detail=False)
    ranged = fs.cat_file(path, start=1_000_000, end=1_000_100)
    fs.rm(path)
    fs.invalidate_cache()
    with fsspec.open(url.rsplit("/", 1)[0] + "-marker", "wb") as handle:  # for the parent to find
        handle.write(b"from the child")
    print(json.dumps({"listed": listed, "size": len(data), "range": ranged.hex(),
                      "gone": not fs.exists(path), "endpoint": fs.s3.meta.endpoint_url}))
""")


def test_a_child_process_reaches_it_through_the_environment_alone(s3_archive_server, tmp_path):  # noqa: F811
    server = s3_archive_server
    data = payload()
    url = server.url("child/archive.bin")
    result = subprocess.run(
        [sys.executable, "-c", CHILD, url],
        input=data,
        capture_output=True,
        env=server.child_environment(PYTHONPATH=str(ROOT)),
        cwd=tmp_path,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-4000:]
    report = json.loads(result.stdout)
    assert report["endpoint"] == server.endpoint_url
    assert report["listed"] == [f"{server.bucket}/child/archive.bin"]
    assert report["size"] == SIZE
    assert bytes.fromhex(report["range"]) == data[1_000_000:1_000_100]
    assert report["gone"]
    # What the child wrote is on our server, reached through the storage options.
    fs = server.filesystem()
    assert not fs.exists(url)
    assert fs.cat_file(server.url("child-marker")) == b"from the child"
    fs.rm(server.url("child-marker"))
    assert not any(tmp_path.iterdir())  # nothing went to the local disk instead


def test_the_environment_names_what_plain_fsspec_needs(s3_archive_server):  # noqa: F811
    server = s3_archive_server
    assert set(server.env) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL"}
    assert (
        server.env["AWS_ENDPOINT_URL"] == server.endpoint_url == server.storage_options["client_kwargs"]["endpoint_url"]
    )
    assert server.url("a/b") == f"s3://{server.bucket}/a/b"
    assert server.endpoint_url.startswith("http://127.0.0.1:")
    child = server.child_environment()
    assert not {key for key in child if key.startswith("AWS_")} - set(server.env)
    assert os.environ.get("AWS_ENDPOINT_URL") != server.endpoint_url  # the parent's environment is untouched


def test_kill_takes_the_server_away(tmp_path):
    from tests.s3_server import PrivateS3

    with PrivateS3(tmp_path) as server:
        fs = server.filesystem()
        fs.pipe_file(f"{server.bucket}/x", b"x")
        assert fs.cat_file(f"{server.bucket}/x") == b"x"
        assert server.startup_seconds is not None
        server.kill()
        assert not server.running
        with pytest.raises(OSError):
            import urllib.request

            urllib.request.urlopen(server.endpoint_url + "/moto-api/", timeout=5)
