"""The recipe reads the same spec through the same schema (contract/spec.py), plus a dataset file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from contract.spec import JobSpec, SpecError, TrainingSpec, load_spec, parse_spec

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))

MINIMAL = {"name": "demo", "model": "tiny-llama", "method": "lora", "data": {"path": "train.jsonl"}}


def write_spec(tmp_path: Path, raw: dict | str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid_for_training(config):
    spec = load_spec(config, for_training=True)
    assert spec.data_path() is not None


def test_the_job_spec_is_the_training_spec_plus_the_planning_sections():
    planning = set(JobSpec.model_fields) - set(TrainingSpec.model_fields)
    assert planning == {"constraints", "local", "sky", "ray"}


def test_the_tiny_demo_points_at_the_shipped_dataset():
    spec = load_spec(REPO / "recipes" / "configs" / "tiny-demo.yaml", for_training=True)
    assert spec.model == "tiny-llama" and spec.method == "lora"
    assert spec.data_path().resolve() == (REPO / "recipes" / "sample_data" / "json_demo.jsonl").resolve()
    assert spec.checkpoint.every_steps and spec.checkpoint.every_minutes
    assert spec.local.price_per_hour == 2.73


def test_relative_data_path_resolves_against_the_spec_directory(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    path = write_spec(tmp_path / "specs", {**MINIMAL, "data": {"path": "../data/train.jsonl"}})
    monkeypatch.chdir(REPO)
    assert load_spec(path).data_path().resolve() == (tmp_path / "data" / "train.jsonl").resolve()
    absolute = write_spec(tmp_path, {**MINIMAL, "data": {"path": "/srv/train.jsonl"}}, "abs.yaml")
    assert load_spec(absolute).data_path() == Path("/srv/train.jsonl")


def test_the_node_spec_is_self_contained(tmp_path):
    (tmp_path / "specs").mkdir()
    spec = load_spec(write_spec(tmp_path / "specs", {**MINIMAL, "data": {"path": "../data/train.jsonl"}}))
    node = spec.node_spec()
    assert node["data"]["path"] == str((tmp_path / "data" / "train.jsonl").resolve())
    again = parse_spec(node, for_training=True)
    assert again.data_path() == spec.data_path().resolve()
    assert again.model_dump(exclude={"data"}) == spec.model_dump(exclude={"data"})
    assert spec.node_spec(data_path="/data/train.jsonl")["data"]["path"] == "/data/train.jsonl"


def test_planning_only_data_sizes_are_not_enough_to_train(tmp_path):
    path = write_spec(tmp_path, {**MINIMAL, "data": {"examples": 1000, "tokens_per_example": 512}})
    load_spec(path)  # fine for planning
    with pytest.raises(SpecError, match=r"missing field 'data.path': training needs a dataset file"):
        load_spec(path, for_training=True)


@pytest.mark.parametrize("override, message", [
    ({"method": "dora"}, r"field 'method': Input should be 'full', 'lora' or 'qlora'"),
    ({"seq_len": 4}, r"field 'seq_len': Input should be greater than or equal to 8"),
    ({"batch": {"micro": 0}}, r"field 'batch.micro'"),
    ({"data": {"path": "x.jsonl", "format": "csv"}}, r"field 'data.format'"),
    ({"data": {"path": "x.jsonl", "validation_fraction": 1.0}}, r"field 'data.validation_fraction'"),
    ({"name": "My Job"}, r"field 'name': must be lowercase"),
    ({"lora": {"r": 0}}, r"field 'lora.r'"),
    ({"optimizer": "adamw"}, r"unknown field 'optimizer'"),
    ({"train": {"learning_rate": 1e-4}}, r"unknown field 'train.learning_rate'"),
])
def test_a_bad_value_is_one_line_naming_the_field(tmp_path, override, message):
    path = write_spec(tmp_path, {**MINIMAL, **override})
    with pytest.raises(SpecError, match=rf"^{path}: {message}") as caught:
        load_spec(path, for_training=True)
    assert "\n" not in str(caught.value)
