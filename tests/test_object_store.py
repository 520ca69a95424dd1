"""Checkpoints the recipe uploads to an object store itself, against a real S3 API (moto's server on loopback).

The manifest is the commit: a step without one is a torn upload and is never resumed; a resume
checks what the recipe needs, verifies every byte of a downloaded copy, and falls back to older
checkpoints.
"""
import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("s3fs")
pytest.importorskip("moto")

from contract.spec import SpecError  # noqa: E402
from recipes.checkpoint import MANIFEST, REQUIRED_FILES, open_checkpoints, verify_checkpoint  # noqa: E402
from recipes.object_store import TORN, ObjectCheckpoints  # noqa: E402
from s3_server import moto_s3, new_bucket, object_keys, s3_env  # noqa: E402


@pytest.fixture(scope="module")
def s3_endpoint():
    with moto_s3() as endpoint:
        yield endpoint


@pytest.fixture
def store(s3_endpoint, monkeypatch, tmp_path):
    import s3fs

    for name, value in s3_env(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()  # a cached client would keep another test's endpoint
    bucket = new_bucket(s3_endpoint)
    return ObjectCheckpoints(f"s3://{bucket}/job-1/checkpoints", cache_dir=tmp_path / "cache")


def _files(step):
    return {"model.pt": {"w": torch.full((4, 4), float(step))}, "optimizer.pt": {"state": {}, "step": step},
            "trainer_state.pt": {"step": step}}


def _keys(store, step):
    """The objects under one step, as S3 itself lists them (boto3, not the store's s3fs)."""
    import os

    bucket, prefix = store.root.split("/", 1)
    prefix += f"/step-{step:08d}/"
    return [key.removeprefix(prefix) for key in object_keys(os.environ["AWS_ENDPOINT_URL"], bucket, prefix)]


def test_a_url_opens_an_object_store_and_a_path_a_directory(tmp_path, store):
    assert isinstance(open_checkpoints(store.location, tmp_path / "cache"), ObjectCheckpoints)
    assert open_checkpoints(str(tmp_path / "ckpt"), tmp_path / "cache").location == str(tmp_path / "ckpt")


def test_an_unknown_scheme_is_one_line_naming_the_url(tmp_path):
    with pytest.raises(SpecError, match=r"^--checkpoint-dir nope://b/x: Protocol not known: nope$"):
        ObjectCheckpoints("nope://b/x", tmp_path)


def test_saved_checkpoint_resumes_from_a_verified_local_copy(store):
    saved = store.save(3, _files(3), keep=2)
    assert saved.path == f"{store.location}/step-00000003"
    assert _keys(store, 3) == sorted([*REQUIRED_FILES, MANIFEST])
    path, skipped = store.find_resumable(REQUIRED_FILES)
    assert skipped == [] and verify_checkpoint(path, REQUIRED_FILES) is None
    assert torch.equal(torch.load(path / "model.pt", weights_only=True)["w"], torch.full((4, 4), 3.0))
    manifest = json.loads((path / MANIFEST).read_text())
    assert saved.bytes == sum(f["bytes"] for f in manifest["files"].values()) + len((path / MANIFEST).read_bytes())
    store.release(path)
    assert not path.exists()


def test_only_the_newest_keep_checkpoints_remain_and_older_torn_uploads_go(store):
    store.save(1, _files(1), keep=2)
    store.fs.pipe_file(f"{store.root}/step-00000002/model.pt", b"half an upload")  # a node killed mid-save
    for step in (3, 4, 5):
        store.save(step, _files(step), keep=2)
    assert store.steps() == [4, 5] == store.committed_steps()


def test_torn_upload_is_skipped_deleted_and_the_previous_checkpoint_used(store):
    store.save(1, _files(1), keep=3)
    store.save(2, _files(2), keep=3)
    store.fs.rm_file(f"{store.root}/step-00000002/{MANIFEST}")  # files up, commit never made
    path, skipped = store.find_resumable(REQUIRED_FILES)
    assert path.name == "step-00000001"
    assert [(s.step, s.reason) for s in skipped] == [(2, TORN)]
    assert store.reject(skipped[0]) == "deleted (torn upload)"
    assert store.steps() == [1]


def test_a_manifest_without_what_the_recipe_needs_is_not_resumable(store):
    store.save(1, _files(1), keep=3)
    no_optimizer = {k: v for k, v in _files(2).items() if k != "optimizer.pt"}
    store.save(2, no_optimizer, keep=3)  # verifies against its own listing, but cannot resume
    path, skipped = store.find_resumable(REQUIRED_FILES)
    assert path.name == "step-00000001"
    assert [(s.step, s.reason) for s in skipped] == [(2, "manifest does not list optimizer.pt")]


def test_a_file_of_the_wrong_size_is_skipped_before_any_download(store):
    store.save(1, _files(1), keep=3)
    store.save(2, _files(2), keep=3)
    store.fs.pipe_file(f"{store.root}/step-00000002/optimizer.pt", b"truncated")
    path, skipped = store.find_resumable(REQUIRED_FILES)
    assert path.name == "step-00000001"
    assert skipped[0].step == 2 and "optimizer.pt has 9 bytes" in skipped[0].reason


def test_a_flipped_byte_fails_the_sha256_and_moves_aside_for_inspection(store):
    store.save(1, _files(1), keep=3)
    store.save(2, _files(2), keep=3)
    key = f"{store.root}/step-00000002/model.pt"
    data = bytearray(store.fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    store.fs.pipe_file(key, bytes(data))
    path, skipped = store.find_resumable(REQUIRED_FILES)
    assert path.name == "step-00000001"
    assert [(s.step, s.reason) for s in skipped] == [(2, "model.pt does not match its sha256")]
    moved = store.reject(skipped[0])
    assert moved == f"{store.location}/rejected-step-00000002"
    assert store.steps() == [1]
    assert sorted(p.rsplit("/", 1)[-1] for p in store.fs.find(f"{store.root}/rejected-step-00000002")) == sorted(
        [*REQUIRED_FILES, MANIFEST])


def test_rewriting_a_step_removes_its_old_commit_first(store):
    store.save(2, _files(2), keep=3)
    store.save(2, _files(20), keep=3)  # a resumed timeline reaching the same step
    path, _ = store.find_resumable(REQUIRED_FILES)
    assert torch.equal(torch.load(path / "model.pt", weights_only=True)["w"], torch.full((4, 4), 20.0))


def test_nothing_in_the_store_means_a_fresh_start(store):
    assert store.find_resumable(REQUIRED_FILES) == (None, [])


def test_a_new_node_continues_from_the_event_log_kept_with_the_checkpoints(store, tmp_path):
    from contract.events import EventLog, next_attempt

    first_node = tmp_path / "node-1" / "events.jsonl"
    log = EventLog(first_node, attempt=1)
    log.emit("start", resumed_from_step=None)
    log.close()
    store.publish_events(first_node)

    second_node = tmp_path / "node-2" / "events.jsonl"
    assert store.restore_events(second_node) is True
    assert next_attempt(second_node) == 2
    assert store.restore_events(second_node) is False  # a node's own log is never replaced


def test_memory_urls_work_too(tmp_path):
    memory = open_checkpoints("memory://spotune-test/ckpt", tmp_path / "cache")
    memory.save(1, _files(1), keep=1)
    memory.save(2, _files(2), keep=1)
    path, skipped = memory.find_resumable(REQUIRED_FILES)
    assert path.name == "step-00000002" and skipped == [] and memory.steps() == [2]


def test_a_file_that_fails_to_serialize_is_never_committed(store):
    store.save(1, _files(1), keep=3)
    unpicklable = {**_files(2), "optimizer.pt": {"state": lambda: None}}
    with pytest.raises(Exception):
        store.save(2, unpicklable, keep=3)
    assert "optimizer.pt" not in _keys(store, 2) and MANIFEST not in _keys(store, 2)
    path, skipped = store.find_resumable(REQUIRED_FILES)
    assert path.name == "step-00000001" and [s.reason for s in skipped] == [TORN]
