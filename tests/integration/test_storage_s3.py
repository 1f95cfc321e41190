"""Storage over the S3 protocol, against moto's S3 server on loopback (a real HTTP endpoint)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from queueformer.contract.errors import NotFound
from queueformer.server.storage import Storage
from tests.conftest import free_port


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def store(s3_endpoint: str) -> Storage:
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="test", aws_secret_access_key="test"
    )
    if "queueformer-test" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket="queueformer-test")
    options = {
        "key": "test",
        "secret": "test",
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    return Storage("s3://queueformer-test/prefix", options)


def test_objects_round_trip_with_ranges(store: Storage) -> None:
    assert not store.local
    uri = store.put_json(store.result_key("job-0123456789abcdef"), {"ok": True})
    assert uri == "s3://queueformer-test/prefix/results/job-0123456789abcdef.json"
    assert store.get_json("results/job-0123456789abcdef.json") == {"ok": True}
    store.put_bytes(store.file_key("file-0123456789abcdef"), b"line-1\nline-2\n")
    assert store.read_range("files/file-0123456789abcdef", 7, 13) == b"line-2"
    with store.open_read("files/file-0123456789abcdef") as fh:
        assert fh.readline() == b"line-1\n"
    store.delete("files/file-0123456789abcdef")
    with pytest.raises(NotFound):
        store.get_bytes("files/file-0123456789abcdef")


def test_failed_upload_leaves_no_object(store: Storage) -> None:
    key = store.file_key("file-fedcba9876543210")
    with pytest.raises(RuntimeError), store.open_write(key) as fh:
        fh.write(b"x" * 1024)
        raise RuntimeError("client died mid-upload")
    assert not store.exists(key)


def test_checkpoint_directories_with_manifests(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "adapter.safetensors").write_bytes(b"\x00" * 2048)
    key = store.checkpoint_key("job-0123456789abcdef", 10)
    store.put_dir(src, key, {"step": 10})
    assert store.dir_complete(key) and store.manifest(key)["step"] == 10
    out = store.get_dir(key, tmp_path / "back")
    assert (out / "adapter.safetensors").read_bytes() == b"\x00" * 2048
