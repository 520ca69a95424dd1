"""Checkpoint files: atomic save, verification, fallback to the previous one, pruning, RNG state."""
import json
import random

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from recipes.checkpoint import (  # noqa: E402
    MANIFEST,
    capture_rng_state,
    find_resumable,
    list_checkpoints,
    load_checkpoint_file,
    reject,
    remove_partial_saves,
    restore_rng_state,
    save_checkpoint,
    verify_checkpoint,
)


def _files(step):
    return {"model.pt": {"w": torch.full((4, 4), float(step))}, "trainer_state.pt": {"step": step}}


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_saved_checkpoint_verifies_and_round_trips(tmp_path):
    saved = save_checkpoint(tmp_path, 7, _files(7), keep=2)
    assert saved.path == tmp_path / "step-00000007"
    assert verify_checkpoint(saved.path) is None
    manifest = json.loads((saved.path / MANIFEST).read_text())
    assert manifest["step"] == 7
    assert set(manifest["files"]) == {"model.pt", "trainer_state.pt"}
    assert saved.bytes == sum(p.stat().st_size for p in saved.path.iterdir())
    assert torch.equal(load_checkpoint_file(saved.path, "model.pt")["w"], torch.full((4, 4), 7.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_only_the_newest_keep_checkpoints_remain(tmp_path):
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, _files(step), keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]


def test_flipped_byte_falls_back_to_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 1, _files(1), keep=3)
    newest = save_checkpoint(tmp_path, 2, _files(2), keep=3)
    _flip_a_byte(newest.path / "model.pt")
    path, skipped = find_resumable(tmp_path)
    assert path == tmp_path / "step-00000001"
    assert [(s.step, s.reason) for s in skipped] == [(2, "model.pt does not match its sha256")]


def test_missing_manifest_or_file_is_never_resumed_from(tmp_path):
    save_checkpoint(tmp_path, 1, _files(1), keep=3)
    no_manifest = save_checkpoint(tmp_path, 2, _files(2), keep=3)
    (no_manifest.path / MANIFEST).unlink()
    truncated = save_checkpoint(tmp_path, 3, _files(3), keep=3)
    (truncated.path / "trainer_state.pt").write_bytes(b"")
    path, skipped = find_resumable(tmp_path)
    assert path.name == "step-00000001"
    assert [s.step for s in skipped] == [3, 2]
    assert "no manifest" in skipped[1].reason and "bytes" in skipped[0].reason


def test_nothing_valid_means_fresh_start(tmp_path):
    assert find_resumable(tmp_path / "absent") == (None, [])
    only = save_checkpoint(tmp_path, 5, _files(5), keep=2)
    _flip_a_byte(only.path / MANIFEST)
    path, skipped = find_resumable(tmp_path)
    assert path is None and len(skipped) == 1


def test_rejected_checkpoint_leaves_lookup_and_same_step_can_be_saved_again(tmp_path):
    save_checkpoint(tmp_path, 1, _files(1), keep=2)
    bad = save_checkpoint(tmp_path, 2, _files(2), keep=2)
    _flip_a_byte(bad.path / "model.pt")
    moved = reject(bad.path)
    assert moved.name == "rejected-step-00000002"
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    again = save_checkpoint(tmp_path, 2, _files(2), keep=2)
    assert verify_checkpoint(again.path) is None


def test_save_killed_midway_leaves_only_a_temp_dir_that_is_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, _files(1), keep=2)
    (tmp_path / ".tmp-step-00000002-999").mkdir()
    (tmp_path / ".tmp-step-00000002-999" / "model.pt").write_bytes(b"partial")
    assert find_resumable(tmp_path)[0].name == "step-00000001"
    remove_partial_saves(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]


def test_rng_state_survives_a_checkpoint_round_trip(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(1)
    save_checkpoint(tmp_path, 1, {"rng.pt": capture_rng_state()}, keep=1)
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(load_checkpoint_file(tmp_path / "step-00000001", "rng.pt"))
    actual = (random.random(), np.random.normal(), torch.rand(3))
    assert actual[0] == expected[0] and actual[1] == expected[1]
    assert torch.equal(actual[2], expected[2])


def test_data_position_splits_the_stream_exactly():
    """Taking blocks in two goes from a saved (epoch, index) equals taking them in one go."""
    from recipes.trainer import DataOrder

    order = DataOrder(n_blocks=10, seed=42)
    whole, *end = order.take(0, 0, 27)
    first, epoch, index = order.take(0, 0, 13)
    rest, *resumed_end = DataOrder(n_blocks=10, seed=42).take(epoch, index, 14)
    assert first + rest == whole and resumed_end == end == [2, 7]
    assert sorted(whole[:10]) == sorted(whole[10:20]) == list(range(10))  # each epoch: every block once
    assert whole[:10] != whole[10:20]  # reshuffled per epoch


def test_learning_rate_warms_up_then_decays_to_zero():
    from recipes.trainer import lr_factor

    cosine = [lr_factor(s, total_steps=10, warmup_steps=2, schedule="cosine") for s in range(10)]
    assert cosine[0] < cosine[1] < cosine[2] == 1.0 and cosine[-1] < 0.05
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))
    assert [lr_factor(s, 10, 0, "linear") for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    assert lr_factor(5, 10, 0, "constant") == 1.0


def test_attempts_number_themselves_from_the_event_log_when_not_told(tmp_path):
    from contract.events import EventLog, next_attempt

    log_path = tmp_path / "events.jsonl"
    assert next_attempt(log_path) == 1
    for attempt in (1, 2):
        log = EventLog(log_path, attempt=attempt)
        log.emit("start", resumed_from_step=None)
        log.emit("step", step=attempt)
        log.close()
    assert next_attempt(log_path) == 3
