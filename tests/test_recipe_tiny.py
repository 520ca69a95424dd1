"""recipes/tiny.py: tiny-llama is built once, atomically, identically, and loads like any checkpoint."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from recipes.tiny import ARCHITECTURE, VOCAB_SIZE, build_tokenizer, ensure_tiny_model, local_model_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_built_once_then_loaded_through_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_tiny_model(tmp_path)
    assert path == tmp_path / "tiny-llama"
    weights = path / "model.safetensors"
    first_build = weights.stat().st_mtime_ns
    assert ensure_tiny_model(tmp_path) == path
    assert weights.stat().st_mtime_ns == first_build  # second call reuses the build
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]  # no temporary directories left

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert config.model_type == "llama"
    assert {key: getattr(config, key) for key in ARCHITECTURE} == ARCHITECTURE
    assert len(tokenizer) == VOCAB_SIZE == config.vocab_size
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        config.bos_token_id, config.eos_token_id, config.pad_token_id)
    assert tokenizer.chat_template


def test_cache_location_follows_spotune_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTUNE_CACHE", str(tmp_path / "cache"))
    assert local_model_path("tiny-llama") == str(tmp_path / "cache" / "tiny-llama")
    assert (tmp_path / "cache" / "tiny-llama" / "config.json").is_file()


def test_other_model_names_pass_through_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("SPOTUNE_CACHE", str(tmp_path))
    assert local_model_path("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert local_model_path("/models/my-llama") == "/models/my-llama"
    assert not any(tmp_path.iterdir())


def test_two_racing_builds_end_with_one_complete_identical_model(tmp_path):
    script = "import sys; from recipes.tiny import ensure_tiny_model; print(ensure_tiny_model(sys.argv[1]))"
    racers = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [racer.communicate(timeout=300) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], [err for _, err in outputs]
    assert {out.strip() for out, _ in outputs} == {str(tmp_path / "tiny-llama")}
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]

    # Every machine (e.g. the next spot node after a preemption) builds the very same weights.
    elsewhere = ensure_tiny_model(tmp_path / "elsewhere")
    assert digest(elsewhere / "model.safetensors") == digest(tmp_path / "tiny-llama" / "model.safetensors")
    assert digest(elsewhere / "tokenizer.json") == digest(tmp_path / "tiny-llama" / "tokenizer.json")


def test_a_half_written_build_is_replaced(tmp_path):
    broken = tmp_path / "tiny-llama"
    broken.mkdir()
    (broken / "config.json").write_text("{}")  # no completion marker: an interrupted older build
    path = ensure_tiny_model(tmp_path)
    assert (path / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]


def test_the_tokenizer_is_byte_level_and_round_trips_any_text():
    tokenizer = build_tokenizer()
    text = 'Réserve «Sakura» pour 4 — {"time":"19:00"} 🍣'
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
