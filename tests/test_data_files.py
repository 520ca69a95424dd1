"""Bundled data files read as typed models: figures by name, and a malformed file stops with one
line naming the file and the field (a UserError, so the CLI prints it and exits 2)."""
from __future__ import annotations

import copy
from decimal import Decimal

import pydantic
import pytest
import yaml

import orchestrator.catalog.managed as managed
import orchestrator.catalog.specs as specs
import orchestrator.estimate as estimate
from contract.errors import UserError
from orchestrator.catalog import gpu_specs, load_managed_prices
from orchestrator.datafile import DataFileError
from orchestrator.estimate import CALIBRATION_PATH, PREEMPTION_PATH, calibration_from_data, load_calibration
from orchestrator.estimate.figures import CalibrationFile


def _cached_loaders():
    return (load_calibration, managed._load, specs._load_specs)


@pytest.fixture
def fresh_caches():
    """Loaders cache the bundled files; a test that swaps a file must not leak it into others."""
    for loader in _cached_loaders():
        loader.cache_clear()
    yield
    for loader in _cached_loaders():
        loader.cache_clear()


def _raw(path):
    return copy.deepcopy(yaml.safe_load(path.read_text()))


def _one_line_naming(err: pytest.ExceptionInfo, *parts: str) -> str:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message
    return message


def _written(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- typed access ------------------------------------------------------------------------------

def test_calibration_figures_are_attributes_with_their_yaml_names():
    cal = load_calibration()
    raw = _raw(CALIBRATION_PATH)
    assert cal.recipe.full_bytes_per_param.weights == raw["recipe"]["full_bytes_per_param"]["weights"] == 2
    assert cal.recipe.logits_bytes_per_token_vocab.bf16_head == 14
    assert cal.runtime.cuda_context_gib == raw["runtime"]["cuda_context_gib"]
    assert cal.overheads.setup_minutes == raw["overheads"]["setup_minutes"]
    assert cal.micro_step_floor.seconds_per_layer == pytest.approx(0.002)
    assert cal.preemption("aws").rate_per_hour == _raw(PREEMPTION_PATH)["providers"]["aws"]["rate_per_hour"]
    assert cal.preemption("nowhere") == cal.preemption_default
    assert cal.device("CPU").mfu_override["lora"] == raw["devices"]["CPU"]["mfu"]["lora"]


def test_figures_keep_their_written_type_so_estimates_do_not_drift():
    # An int in the YAML stays an int: the assumptions stored with an estimate read as they always did.
    assumptions = load_calibration().assumptions()
    assert assumptions["recipe"]["full_bytes_per_param"] == {"weights": 2, "gradients": 2, "optimizer": 4}
    assert type(assumptions["recipe"]["full_bytes_per_param"]["weights"]) is int
    assert assumptions["preemption"]["aws"]["source"]


def test_figures_are_frozen():
    cal = load_calibration()
    with pytest.raises(pydantic.ValidationError):
        cal.recipe.nf4_bytes_per_param = 1
    with pytest.raises(pydantic.ValidationError):
        gpu_specs()["H100"].vram_gb = 1
    with pytest.raises(pydantic.ValidationError):
        load_managed_prices()[0].price_per_million_tokens = Decimal(0)


def test_managed_prices_and_gpu_specs_are_typed():
    together = next(p for p in load_managed_prices() if p.service == "together" and p.methods == ("lora", "qlora"))
    assert together.price_per_million_tokens == Decimal("0.48") and together.max_params == 9.0e9
    h100 = gpu_specs()["H100"]
    assert (h100.name, h100.bf16_tflops, h100.bf16, h100.max_vram_gb) == ("H100", 989.0, True, 94.0)
    assert gpu_specs()["L4"].memory_variants_gb == (24.0,)    # one size sold: the variants default to it


def test_yaml_numbers_pyyaml_reads_as_text_still_count():
    # PyYAML reads 1.236e9 (no dot-and-sign exponent) as a string; the figure is still a number.
    cal = load_calibration()
    assert cal.mfu["full"].points[0][0] == 1.236e9


# ---- malformed files -----------------------------------------------------------------------------

def test_a_wrong_calibration_figure_names_the_file_and_the_field(tmp_path, monkeypatch, fresh_caches):
    raw = _raw(CALIBRATION_PATH)
    raw["recipe"]["full_bytes_per_param"]["weights"] = "two"
    monkeypatch.setattr(estimate, "CALIBRATION_PATH", _written(tmp_path, "calibration.yaml", raw))
    with pytest.raises(UserError) as err:
        load_calibration()
    assert isinstance(err.value, DataFileError)
    _one_line_naming(err, "calibration.yaml", "field 'recipe.full_bytes_per_param.weights'", "must be a number", "'two'")


@pytest.mark.parametrize("change, field, says", [
    (lambda raw: raw["recipe"].pop("nf4_bytes_per_param"), "recipe.nf4_bytes_per_param", "missing field"),
    (lambda raw: raw["recipe"].update(nf4_byte_per_param=0.5), "recipe.nf4_byte_per_param", "unknown field"),
    (lambda raw: raw["throughput"]["mfu"]["lora"][1].update(mfu=-0.2), "throughput.mfu.lora[1].mfu", "must be above 0"),
    (lambda raw: raw["throughput"]["multi_gpu_efficiency"]["counts"].update({"eight": 0.9}),
     "throughput.multi_gpu_efficiency.counts.eight", "integer"),
    (lambda raw: raw["devices"]["CPU"]["mfu"].update(fast=1.0), "devices.CPU.mfu.fast",
     "'full', 'lora' or 'qlora'"),
    (lambda raw: raw["recipe"].update(qlora_fp32_upcast="no"), "recipe.qlora_fp32_upcast", "boolean"),
    (lambda raw: raw["overheads"].pop("source"), "overheads.source", "missing field"),
])
def test_every_kind_of_calibration_mistake_is_one_line_naming_the_field(change, field, says):
    raw = _raw(CALIBRATION_PATH)
    change(raw)
    with pytest.raises(DataFileError) as err:
        calibration_from_data(raw, _raw(PREEMPTION_PATH), gpu_specs())
    _one_line_naming(err, "orchestrator/estimate/calibration.yaml", f"'{field}'", says)


def test_a_wrong_preemption_rate_names_the_provider(tmp_path, monkeypatch, fresh_caches):
    raw = _raw(PREEMPTION_PATH)
    raw["providers"]["gcp"]["rate_per_hour"] = None
    monkeypatch.setattr(estimate, "PREEMPTION_PATH", _written(tmp_path, "preemption.yaml", raw))
    with pytest.raises(DataFileError) as err:
        load_calibration()
    _one_line_naming(err, "preemption.yaml", "field 'providers.gcp.rate_per_hour'", "must be a number")


def test_malformed_yaml_gives_the_line(tmp_path):
    path = tmp_path / "calibration.yaml"
    path.write_text("recipe:\n  full_bytes_per_param: {weights: 2\nruntime: {}\n")
    from orchestrator.datafile import load_data_file

    with pytest.raises(DataFileError) as err:
        load_data_file(path, CalibrationFile)
    _one_line_naming(err, str(path), "malformed YAML at line")


def test_a_wrong_managed_price_names_the_row_and_field(tmp_path, monkeypatch, fresh_caches):
    raw = _raw(managed.MANAGED_PATH)
    raw["prices"][1]["price_per_million_tokens"] = "cheap"
    monkeypatch.setattr(managed, "MANAGED_PATH", _written(tmp_path, "managed.yaml", raw))
    with pytest.raises(DataFileError) as err:
        load_managed_prices()
    _one_line_naming(err, "managed.yaml", "field 'prices[1].price_per_million_tokens'", "price")


def test_a_managed_price_for_an_unknown_method_is_refused(tmp_path, monkeypatch, fresh_caches):
    raw = _raw(managed.MANAGED_PATH)
    raw["prices"][0]["methods"] = ["lora", "dpo"]
    monkeypatch.setattr(managed, "MANAGED_PATH", _written(tmp_path, "managed.yaml", raw))
    with pytest.raises(DataFileError) as err:
        load_managed_prices()
    _one_line_naming(err, "field 'prices[0].methods[1]'", "'dpo'")


def test_a_wrong_gpu_spec_names_the_gpu_and_field(tmp_path, monkeypatch, fresh_caches):
    raw = _raw(specs.SPECS_PATH)
    raw["H100"]["bf16_tflops"] = 0
    monkeypatch.setattr(specs, "SPECS_PATH", _written(tmp_path, "gpu_specs.yaml", raw))
    with pytest.raises(DataFileError) as err:
        gpu_specs()
    _one_line_naming(err, "gpu_specs.yaml", "field 'H100.bf16_tflops'", "must be above 0")


def test_a_gpu_spec_that_is_not_a_table_is_named(tmp_path, monkeypatch, fresh_caches):
    raw = _raw(specs.SPECS_PATH)
    raw["A100"] = 40
    monkeypatch.setattr(specs, "SPECS_PATH", _written(tmp_path, "gpu_specs.yaml", raw))
    with pytest.raises(DataFileError) as err:
        gpu_specs()
    _one_line_naming(err, "gpu_specs.yaml", "field 'A100': must be a mapping")


def test_a_missing_data_file_is_one_line(tmp_path, monkeypatch, fresh_caches):
    monkeypatch.setattr(specs, "SPECS_PATH", tmp_path / "gone.yaml")
    with pytest.raises(DataFileError) as err:
        gpu_specs()
    _one_line_naming(err, "gone.yaml", "cannot read")
