"""recipes/config.py: the recipe's view of a job spec agrees with orchestrator/spec.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from orchestrator.spec import load_spec
from recipes.config import ConfigError, load_train_config, parse_train_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED_CONFIGS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
TRAINING_SECTIONS = ("name", "model", "method", "lora", "data", "seq_len", "epochs", "batch", "checkpoint", "train")

MINIMAL = {"name": "demo", "model": "tiny-llama", "method": "lora", "data": {"path": "train.jsonl"}}


def write_spec(tmp_path: Path, raw: dict | str, name: str = "job.yaml") -> Path:
    path = tmp_path / name
    path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_valid_for_planner_and_recipe_alike(config):
    spec = load_spec(config)
    train = load_train_config(config)
    assert train.data_path().resolve() == spec.data_path().resolve()
    spec_view = spec.to_dict()
    train_view = train.model_dump(mode="json", by_alias=True)
    for section in TRAINING_SECTIONS:
        assert train_view[section] == spec_view[section], section


def test_the_tiny_demo_points_at_the_shipped_dataset():
    cfg = load_train_config(REPO / "recipes" / "configs" / "tiny-demo.yaml")
    assert cfg.model == "tiny-llama" and cfg.method == "lora"
    assert cfg.data_path().resolve() == (REPO / "recipes" / "sample_data" / "json_demo.jsonl").resolve()
    assert cfg.checkpoint.every_steps and cfg.checkpoint.every_minutes
    assert load_spec(REPO / "recipes" / "configs" / "tiny-demo.yaml").local.price_per_hour == 2.73


def test_defaults_match_the_planners_spec(tmp_path):
    path = write_spec(tmp_path, MINIMAL)
    spec_view = load_spec(path).to_dict()
    train_view = load_train_config(path).model_dump(mode="json", by_alias=True)
    assert {s: train_view[s] for s in TRAINING_SECTIONS} == {s: spec_view[s] for s in TRAINING_SECTIONS}


def test_relative_data_path_resolves_against_the_spec_directory(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    path = write_spec(tmp_path / "specs", {**MINIMAL, "data": {"path": "../data/train.jsonl"}})
    monkeypatch.chdir(REPO)
    assert load_train_config(path).data_path().resolve() == (tmp_path / "data" / "train.jsonl").resolve()
    absolute = write_spec(tmp_path, {**MINIMAL, "data": {"path": "/srv/train.jsonl"}}, "abs.yaml")
    assert load_train_config(absolute).data_path() == Path("/srv/train.jsonl")


def test_planning_sections_are_ignored_but_unknown_fields_are_not(tmp_path):
    planning = {"constraints": {"gpus": ["H100"], "anything": "the planner checks this"},
                "local": {"price_per_hour": 2.73}, "sky": {"bucket": "s3://x"}}
    cfg = load_train_config(write_spec(tmp_path, {**MINIMAL, **planning}))
    assert not hasattr(cfg, "constraints")
    with pytest.raises(ConfigError, match=r"unknown field 'optimizer'"):
        load_train_config(write_spec(tmp_path, {**MINIMAL, "optimizer": "adamw"}))
    with pytest.raises(ConfigError, match=r"unknown field 'train.learning_rate'"):
        load_train_config(write_spec(tmp_path, {**MINIMAL, "train": {"learning_rate": 1e-4}}))


def test_planning_only_data_sizes_are_not_enough_to_train(tmp_path):
    path = write_spec(tmp_path, {**MINIMAL, "data": {"examples": 1000, "tokens_per_example": 512}})
    load_spec(path)  # fine for planning
    with pytest.raises(ConfigError, match=r"missing field 'data.path': training needs a dataset file"):
        load_train_config(path)


@pytest.mark.parametrize("override, message", [
    ({"method": "dora"}, r"field 'method': Input should be 'full', 'lora' or 'qlora'"),
    ({"seq_len": 4}, r"field 'seq_len': Input should be greater than or equal to 8"),
    ({"batch": {"micro": 0}}, r"field 'batch.micro'"),
    ({"data": {"path": "x.jsonl", "format": "csv"}}, r"field 'data.format'"),
    ({"data": {"path": "x.jsonl", "validation_fraction": 1.0}}, r"field 'data.validation_fraction'"),
    ({"name": "My Job"}, r"field 'name': must be lowercase"),
    ({"lora": {"r": 0}}, r"field 'lora.r'"),
])
def test_a_bad_value_is_one_line_naming_the_field(tmp_path, override, message):
    path = write_spec(tmp_path, {**MINIMAL, **override})
    with pytest.raises(ConfigError, match=rf"^{path}: {message}") as caught:
        load_train_config(path)
    assert "\n" not in str(caught.value)


def test_missing_required_fields_are_named(tmp_path):
    raw = dict(MINIMAL)
    del raw["model"]
    with pytest.raises(ConfigError, match=r"missing field 'model'"):
        load_train_config(write_spec(tmp_path, raw))


def test_unreadable_specs_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"spec file not found"):
        load_train_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"is a directory"):
        load_train_config(tmp_path)
    with pytest.raises(ConfigError, match=r"job\.yaml: malformed YAML at line \d+, column \d+"):
        load_train_config(write_spec(tmp_path, "name: x\nmodel: [unclosed\n"))
    with pytest.raises(ConfigError, match=r"must be a YAML mapping"):
        parse_train_config(["a", "list"])
