"""Storage on a local disk: key layout, atomic writes, directories with manifests, no escapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from queueformer.contract.errors import InvalidInput, NotFound
from queueformer.server.storage import Storage


@pytest.fixture
def store(tmp_path: Path) -> Storage:
    return Storage(f"file://{tmp_path / 'root'}")


def test_round_trip_and_layout(store: Storage) -> None:
    uri = store.put_json(store.result_key("job-0123456789abcdef"), {"a": 1})
    assert uri == f"{store.url}/results/job-0123456789abcdef.json"
    assert store.get_json("results/job-0123456789abcdef.json") == {"a": 1}
    store.put_bytes(store.file_key("file-0123456789abcdef"), b"0123456789")
    assert store.read_range("files/file-0123456789abcdef", 2, 5) == b"234"
    assert store.size("files/file-0123456789abcdef") == 10
    assert store.list("files") == ["files/file-0123456789abcdef"]


def test_failed_write_leaves_nothing_behind(store: Storage) -> None:
    key = store.file_key("file-0123456789abcdef")
    with pytest.raises(RuntimeError), store.open_write(key) as fh:
        fh.write(b"partial")
        raise RuntimeError("disk went away")
    assert not store.exists(key)
    assert list(Path(store.root).rglob("*.tmp-*")) == []


def test_overwrite_is_atomic(store: Storage) -> None:
    key = store.result_key("job-0123456789abcdef")
    store.put_bytes(key, b"old")
    with store.open_write(key) as fh:
        fh.write(b"new")
        assert store.get_bytes(key) == b"old"  # readers see the old object until the write completes
    assert store.get_bytes(key) == b"new"


@pytest.mark.parametrize("bad", ["../etc/passwd", "job-../../x", "job-0123456789abcdef/../../x", ""])
def test_ids_and_keys_cannot_escape_the_root(store: Storage, bad: str) -> None:
    with pytest.raises(InvalidInput):
        store.result_key(bad)
    with pytest.raises(InvalidInput):
        store.get_bytes(f"results/{bad}/..")


def test_uris_outside_the_root_are_refused(store: Storage) -> None:
    assert store.key_of(f"{store.url}/files/file-0123456789abcdef") == "files/file-0123456789abcdef"
    with pytest.raises(InvalidInput):
        store.key_of("file:///etc/passwd")
    with pytest.raises(InvalidInput):
        store.key_of(f"{store.url}/../other")


def test_directory_counts_only_with_its_manifest(store: Storage, tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    (src / "sub").mkdir(parents=True)
    (src / "weights.bin").write_bytes(b"w" * 1000)
    (src / "sub" / "state.json").write_text("{}")
    key = store.checkpoint_key("job-0123456789abcdef", 40)
    assert not store.dir_complete(key)
    store.put_dir(src, key, {"step": 40})
    assert store.dir_complete(key)
    assert store.manifest(key)["step"] == 40
    out = store.get_dir(key, tmp_path / "restored")
    assert (out / "weights.bin").read_bytes() == b"w" * 1000
    assert (out / "sub" / "state.json").read_text() == "{}"
    with pytest.raises(NotFound):
        store.get_dir(store.checkpoint_key("job-0123456789abcdef", 41), tmp_path / "none")


def test_missing_objects_are_not_found(store: Storage) -> None:
    with pytest.raises(NotFound):
        store.get_bytes("results/job-0123456789abcdef.json")
