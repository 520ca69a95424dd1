"""The price catalog: SkyPilot v8 reader (against real catalog excerpts), bundled snapshot,
managed fine-tuning quotes, GPU specs, SkyPilot export, and `spotune catalog`."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from sky_catalog import write_accelerator_index
from typer.testing import CliRunner

from orchestrator import catalog
from orchestrator.catalog.sky import SKY_HEADERS, read_sky_catalog, read_vms_csv
from orchestrator.catalog.snapshot import snapshot_rows
from contract.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "sky_catalog"   # SkyPilot catalog excerpts; provenance in README.md
CLOUDS = ("aws", "gcp", "lambda", "nebius", "runpod", "vast", "verda")
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="needs the SkyPilot catalog excerpts")


@pytest.fixture
def sky_home(tmp_path, monkeypatch) -> Path:
    """A SKY_RUNTIME_DIR holding the real catalog excerpts as `.sky/catalogs/v8/<cloud>/vms.csv`."""
    v8 = tmp_path / ".sky" / "catalogs" / "v8"
    for cloud in CLOUDS:
        (v8 / cloud).mkdir(parents=True)
        shutil.copyfile(FIXTURES / cloud / "vms.csv", v8 / cloud / "vms.csv")
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path))
    return v8


@pytest.fixture
def sky_offers(sky_home):
    return read_sky_catalog(sky_home)


def pick(offers, provider, instance_type, region=None, zone=None):
    found = [o for o in offers if o.provider == provider and o.instance_type == instance_type
             and (region is None or o.region == region) and (zone is None or o.zone == zone)]
    assert found, f"no {provider} {instance_type} {region or ''} {zone or ''}"
    return found


# --- SkyPilot reader: one test per quirk of the real files ---------------------------------

def test_default_catalog_dir_follows_sky_runtime_dir(sky_home):
    assert catalog.default_sky_catalog_dir() == sky_home
    assert {o.provider for o in catalog.load_offers()} >= set(CLOUDS)


def test_columns_are_read_by_header_name_whatever_their_order(sky_offers):
    lambda_h100 = pick(sky_offers, "lambda", "gpu_8x_h100_sxm5", "us-east-1")[0]
    assert (lambda_h100.gpu, lambda_h100.gpu_count, lambda_h100.price_on_demand) == ("H100", 8, Decimal("31.92"))
    verda = pick(sky_offers, "verda", "1H100.80S.32V")[0]  # verda puts AcceleratorName fifth
    assert (verda.gpu, verda.price_on_demand, verda.price_spot, verda.region) == ("H100", Decimal("2.29"), Decimal("0.8015"), "FIN-02")
    gcp = pick(sky_offers, "gcp", "a3-highgpu-1g", zone="us-central1-a")[0]  # gcp puts prices last
    assert gcp.gpu == "H100" and gcp.vram_gb_per_gpu == 80


def test_runpod_gpuinfo_memory_is_in_gb_not_mib(sky_offers):
    a100 = pick(sky_offers, "runpod", "1x_A100-80GB_SECURE")
    assert {o.vram_gb_per_gpu for o in a100} == {80.0}
    assert {o.vram_gb_per_gpu for o in pick(sky_offers, "runpod", "1x_RTX4090_SECURE")} == {24.0}


def test_runpod_region_is_the_country_and_zone_the_datacentre(sky_offers):
    h100 = pick(sky_offers, "runpod", "1x_H100_SECURE")
    assert {(o.region, o.zone) for o in h100} == {("JP", "AP-JP-1"), ("NL", "EU-NL-1"), ("US", "US-CA-1")}
    assert all(o.price_on_demand == o.price_spot == Decimal("2.89") for o in h100)


def test_vast_memory_is_the_total_across_gpus(sky_offers):
    two_h200 = pick(sky_offers, "vast", "2x-H200-32-65536")[0]
    assert two_h200.gpu_count == 2
    assert two_h200.vram_gb_per_gpu == pytest.approx(287542 / 2 / 1024, abs=0.01)  # ~140 GB each, not 281


def test_vast_zero_spot_price_means_no_spot_market_not_free(sky_offers):
    vast = [o for o in sky_offers if o.provider == "vast"]
    assert len(vast) == 67
    assert all(o.price_spot is None for o in vast)
    h100 = pick(sky_offers, "vast", "1x-H100_SXM-32-65536", "Texas, US, NA")[0]
    assert h100.price_on_demand == Decimal("1.87") and h100.price(spot=True) is None


def test_vast_memory_above_any_real_card_is_capped_to_the_spec(sky_offers):
    rtx4090 = pick(sky_offers, "vast", "1x-RTX_4090-32-65536")
    # One Hong Kong row claims 48 GB on a single 24 GB card: treated as a catalog error.
    assert len(rtx4090) == 3 and all(o.vram_gb_per_gpu == pytest.approx(24, abs=0.02) for o in rtx4090)
    # A real 80 GB A100 listed under the 40 GB name keeps its 80 GB.
    assert 80.0 in {o.vram_gb_per_gpu for o in sky_offers if o.provider == "vast" and o.gpu == "A100"}


def test_vast_free_text_regions_are_kept_verbatim(sky_offers):
    regions = {o.region for o in sky_offers if o.provider == "vast"}
    assert "France, FR, EU" in regions and any(r.startswith(", ") for r in regions)


def test_lambda_has_no_spot_and_keeps_all_17_regions(sky_offers):
    h100 = pick(sky_offers, "lambda", "gpu_8x_h100_sxm5")
    assert len(h100) == 17 and len({o.region for o in h100}) == 17
    assert all(o.price_spot is None and o.price_on_demand == Decimal("31.92") for o in h100)


def test_cpu_only_rows_are_skipped(sky_offers):
    assert not [o for o in sky_offers if o.instance_type.startswith(("cpu_", "cpu-"))]
    assert len([o for o in sky_offers if o.provider == "nebius"]) == 21  # 61 rows, 40 of them CPU
    assert len([o for o in sky_offers if o.provider == "lambda"]) == 22 * 17


def test_nebius_spot_only_where_listed(sky_offers):
    assert pick(sky_offers, "nebius", "gpu-h100-sxm_1gpu-16vcpu-200gb")[0].price_spot == Decimal("1.25")
    assert all(o.price_spot is None for o in pick(sky_offers, "nebius", "gpu-b200-sxm_8gpu-160vcpu-1792gb"))


def test_verda_empty_price_keeps_a_spot_only_offer(sky_offers):
    b200 = pick(sky_offers, "verda", "8B200.240V")[0]
    assert b200.price_on_demand is None and b200.price_spot is not None and b200.price(spot=False) is None
    assert pick(sky_offers, "verda", "1H200.141S.44V")[0].price_spot is None
    assert pick(sky_offers, "verda", "1V100.6V")[0].price_spot is None


def test_aws_prices_are_exact_text_and_empty_spot_is_none(sky_offers):
    p5 = pick(sky_offers, "aws", "p5.48xlarge", "us-east-1")[0]
    assert (p5.price_on_demand, p5.price_spot, p5.zone) == (Decimal("55.04"), Decimal("19.253100"), "use1-az2")
    assert pick(sky_offers, "aws", "p5.48xlarge", "eu-north-1")[0].price_spot is None
    assert pick(sky_offers, "aws", "p3.16xlarge", "ap-northeast-2")[0].price_spot is None
    assert pick(sky_offers, "aws", "g5g.16xlarge")[0].gpu == "T4g"
    assert pick(sky_offers, "aws", "g5.xlarge", "us-east-1")[0].vram_gb_per_gpu == pytest.approx(22.35, abs=0.01)


def test_gcp_gpu_vm_is_priced_as_host_row_plus_accelerator_row_in_the_same_zone(sky_offers):
    a2 = pick(sky_offers, "gcp", "a2-highgpu-1g", zone="us-central1-a")[0]
    assert (a2.gpu, a2.gpu_count) == ("A100", 1)
    assert a2.price_on_demand == Decimal("0.73948") + Decimal("2.93391")
    assert a2.price_spot == Decimal("0.36975") + Decimal("1.4341")
    a3 = pick(sky_offers, "gcp", "a3-highgpu-1g", zone="us-central1-a")[0]
    assert a3.price_on_demand == Decimal("1.18251") + Decimal("4.20076")


def test_gcp_accelerator_without_a_host_in_its_zone_is_not_offered(sky_offers):
    gcp = [o for o in sky_offers if o.provider == "gcp"]
    assert not [o for o in gcp if o.region == "us-east4"]          # H100 rows there, no a3 host row
    assert not [o for o in gcp if o.gpu == "A100" and o.gpu_count == 16 and o.region == "asia-northeast1"]
    assert not [o for o in gcp if o.gpu in ("H200", "B200", "H100-MEGA", "T4", "L4")]  # hosts not in the excerpt
    assert not [o for o in gcp if o.instance_type.startswith("a3-edgegpu")]  # SkyPilot pairs no GPU with it


def test_gcp_accelerator_spot_dearer_than_on_demand_is_kept_not_clamped(sky_offers):
    # A100-80GB x1 europe-west4-a: accelerator on-demand 2.03285, spot 2.1626 (spot is dearer).
    ultra = pick(sky_offers, "gcp", "a2-ultragpu-1g", zone="europe-west4-a")[0]
    assert ultra.price_on_demand == Decimal("1.2105") + Decimal("2.03285")
    assert ultra.price_spot == Decimal("0.47328") + Decimal("2.1626")


def test_host_vcpus_and_memory_are_read_with_each_offer(sky_offers):
    p5 = pick(sky_offers, "aws", "p5.48xlarge", "us-east-1")[0]
    assert (p5.vcpus, p5.memory_gib) == (192.0, 2048.0)
    a2 = pick(sky_offers, "gcp", "a2-highgpu-1g", zone="us-central1-a")[0]  # from the host row
    assert (a2.vcpus, a2.memory_gib) == (12.0, 85.0)
    vast = pick(sky_offers, "vast", "2x-H200-32-65536")[0]
    assert (vast.vcpus, vast.memory_gib) == (32.0, 64.0)
    assert all(o.vcpus and o.memory_gib for o in sky_offers)


def test_vram_falls_back_to_the_spec_table_without_gpuinfo(tmp_path):
    vms = tmp_path / "lambda" / "vms.csv"
    vms.parent.mkdir()
    vms.write_text(",".join(SKY_HEADERS["lambda"]) + "\ngpu_1x_h100_pcie,H100,1.0,26.0,200.0,3.29,us-east-1,,\n")
    (offer,) = read_sky_catalog(tmp_path)
    assert offer.vram_gb_per_gpu == catalog.gpu_specs()["H100"].vram_gb == 80


def test_a_file_that_is_not_a_skypilot_catalog_is_one_clear_error(tmp_path):
    vms = tmp_path / "lambda" / "vms.csv"
    vms.parent.mkdir()
    vms.write_text("name,price\nfoo,1\n")
    with pytest.raises(UserError, match=r"lambda/vms.csv: not a SkyPilot vms.csv \(no InstanceType, AcceleratorName"):
        catalog.load_offers(tmp_path)


def test_reader_rereads_a_file_when_it_changes(tmp_path):
    vms = tmp_path / "vms.csv"
    header = ",".join(SKY_HEADERS["lambda"]) + "\n"
    vms.write_text(header + "gpu_1x_a10,A10,1.0,30.0,200.0,1.29,us-east-1,,\n")
    assert read_vms_csv(vms, "lambda")[0].price_on_demand == Decimal("1.29")
    vms.write_text(header + "gpu_1x_a10,A10,1.0,30.0,200.0,1.49,us-east-1,,\n")
    os.utime(vms, ns=(vms.stat().st_atime_ns, vms.stat().st_mtime_ns + 1_000_000_000))
    assert read_vms_csv(vms, "lambda")[0].price_on_demand == Decimal("1.49")


# --- merging with the bundled snapshot ----------------------------------------------------

def test_skypilot_rows_replace_bundled_rows_for_the_same_provider_region_instance(sky_home):
    offers = catalog.load_offers(sky_home)
    runpod_h100 = pick(offers, "runpod", "1x_H100_SECURE", "US")
    assert len(runpod_h100) == 1 and runpod_h100[0].source.endswith("runpod/vms.csv")
    azure = [o for o in offers if o.provider == "azure"]
    assert azure and all(o.source == "bundled" for o in azure)  # SkyPilot's excerpt has no azure
    lambda_tokyo = pick(offers, "lambda", "gpu_1x_a10", "asia-northeast-1")  # not bundled, from SkyPilot
    assert lambda_tokyo[0].source != "bundled"


def test_without_skypilot_catalog_only_the_bundled_snapshot_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(tmp_path))  # no .sky there
    offers = catalog.load_offers()
    assert offers and all(o.source == "bundled" for o in offers)
    assert catalog.load_offers(FIXTURES, include_sky=False) == offers


# --- bundled snapshot ---------------------------------------------------------------------

def test_bundled_snapshot_rows_are_sourced_dated_priced_and_known():
    rows = snapshot_rows()
    specs = catalog.gpu_specs()
    assert 200 <= len(rows) <= 1000
    for offer, source in rows:
        assert source and offer.read_on and offer.read_on <= catalog.snapshot_date(), offer
        assert offer.price_on_demand is not None or offer.price_spot is not None, offer
        assert all(p is None or p > 0 for p in (offer.price_on_demand, offer.price_spot)), offer
        assert offer.gpu in specs and offer.gpu_count >= 1 and offer.vram_gb_per_gpu > 0, offer
        assert offer.vcpus and offer.vcpus > 0 and offer.memory_gib and offer.memory_gib > 0, offer
    assert {o.provider for o, _ in rows} >= {"aws", "gcp", "azure", "lambda", "runpod", "vast", "nebius", "verda"}
    assert {o.gpu for o, _ in rows} >= {"H100", "H200", "B200", "A100", "A100-80GB", "L40S", "A10G", "L4", "A10",
                                        "RTX4090", "A6000"}


def test_bundled_snapshot_keeps_the_skypilot_figures_it_was_built_from():
    bundled = catalog.load_offers(include_sky=False)
    p4d = pick(bundled, "aws", "p4d.24xlarge", "us-east-1")[0]
    assert (p4d.price_on_demand, p4d.price_spot) == (Decimal("21.957642"), Decimal("7.879900"))
    assert pick(bundled, "gcp", "a2-highgpu-1g", zone="us-central1-a")[0].price_on_demand == Decimal("3.67339")
    assert (p4d.vcpus, p4d.memory_gib) == (96.0, 1152.0)


def test_bundled_rows_not_from_skypilot_carry_the_published_instance_shape():
    bundled = catalog.load_offers(include_sky=False)
    nd_h100 = pick(bundled, "azure", "Standard_ND96isr_H100_v5", "eastus")[0]
    assert (nd_h100.vcpus, nd_h100.memory_gib) == (96.0, 1900.0)
    assert (pick(bundled, "gcp", "n1-standard-8")[0].vcpus, pick(bundled, "gcp", "n1-standard-8")[0].memory_gib) == (8.0, 30.0)


# --- GPU specs ----------------------------------------------------------------------------

def test_gpu_specs_cover_catalog_gpus():
    specs = catalog.gpu_specs()
    assert specs["H100"].bf16_tflops == 989 and specs["H100-PCIE"].bf16_tflops == 756
    assert specs["A100"].bf16_tflops == 312 and specs["L40S"].bf16_tflops == 362
    assert not specs["V100"].bf16 and not specs["T4"].bf16 and specs["L4"].bf16
    assert all(s.vram_gb > 0 and s.memory_bandwidth_gbs > 0 for s in specs.values())


def test_spec_for_tells_an_h100_pcie_from_an_sxm_by_instance_type():
    from orchestrator.catalog.specs import spec_for

    assert spec_for("H100", "gpu_1x_h100_pcie").bf16_tflops == 756
    assert spec_for("H100", "1x_H100_SECURE").bf16_tflops == 756
    assert spec_for("H100", "1x_H100-SXM_SECURE").bf16_tflops == 989
    assert spec_for("H100", "p5.48xlarge").bf16_tflops == 989
    assert spec_for("H100", "1x-H100_NVL-32-65536").name == "H100-NVL"
    assert spec_for("L40S", "anything").name == "L40S" and spec_for("NoSuchGPU") is None


# --- managed fine-tuning ------------------------------------------------------------------

def test_worked_example_together_lora_7b_costs_7_37():
    total_tokens = 10_000 * 512 * 3
    assert total_tokens == 15_360_000
    quotes = catalog.managed_quotes(7_000_000_000, "lora", total_tokens)
    together = [q for q in quotes if q.service == "together"]
    assert len(together) == 1
    assert together[0].price_per_million_tokens == Decimal("0.48")
    assert together[0].to_json()["cost"] == "7.3728"   # exact: 15.36 M tokens x $0.48 (the plan table shows $7.37)
    assert quotes[0] is together[0]  # cheapest first


def test_size_tiers_map_real_model_sizes():
    def together(params, method):
        return [q for q in catalog.managed_quotes(params, method, 1_000_000) if q.service == "together"]

    assert together(8_030_261_248, "lora")[0].model == "7B tier"          # Llama-3.1-8B
    assert together(13_000_000_000, "full")[0].price_per_million_tokens == Decimal("1.30")
    seventy = together(70_553_706_496, "lora")[0]
    assert seventy.model == "70B tier" and "range $2.00-$3.00" in seventy.note
    assert together(405_000_000_000, "lora") == []                         # no tier above 80B
    assert "QLoRA priced as LoRA" in together(7_000_000_000, "qlora")[0].note


def test_openai_quote_carries_its_2026_wind_down():
    quotes = catalog.managed_quotes(7_000_000_000, "full", 15_360_000)
    openai = {q.model: q for q in quotes if q.service == "openai"}
    assert openai["gpt-4o"].cost == Decimal("384.00") and openai["gpt-4o-mini"].price_per_million_tokens == 3
    assert all("closed to new users" in q.note for q in openai.values())
    assert [q for q in quotes if q.service == "vertex-ai"][0].cost == Decimal("46.08")


def test_managed_prices_are_sourced_and_dated():
    prices = catalog.load_managed_prices()
    assert {p.service for p in prices} == {"together", "openai", "vertex-ai"}
    assert all(p.source and p.read_on and p.price_per_million_tokens > 0 for p in prices)


def test_managed_quotes_reject_an_unknown_method():
    with pytest.raises(UserError, match="unknown method"):
        catalog.managed_quotes(7_000_000_000, "dpo", 1000)


# --- export -------------------------------------------------------------------------------

def _fields(offers):
    return sorted((o.provider, o.region, o.zone, o.instance_type, o.gpu, o.gpu_count, o.vram_gb_per_gpu,
                   o.price_on_demand, o.price_spot, o.vcpus, o.memory_gib) for o in offers)


def test_export_round_trips_through_the_reader(sky_home, tmp_path):
    offers = catalog.load_offers(sky_home)
    out = tmp_path / "export"
    written = catalog.export_sky(offers, out)
    assert {p.parent.name for p in written} == {o.provider for o in offers}
    assert _fields(read_sky_catalog(out)) == _fields(offers)


def test_export_round_trips_the_bundled_snapshot_with_its_host_shapes(tmp_path):
    bundled = catalog.load_offers(include_sky=False)
    catalog.export_sky(bundled, tmp_path)
    assert _fields(read_sky_catalog(tmp_path)) == _fields(bundled)


def test_export_leaves_out_offers_without_vcpus_or_memory_with_one_counted_warning(tmp_path, caplog):
    from dataclasses import replace

    bundled = catalog.load_offers(include_sky=False)
    azure = [o for o in bundled if o.provider == "azure"]
    shapeless = [replace(azure[0], vcpus=None), replace(azure[1], memory_gib=None)]
    catalog.export_sky(azure[2:] + shapeless, tmp_path)
    exported = read_sky_catalog(tmp_path)
    assert _fields(exported) == _fields(azure[2:])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["skipped 2 offer(s) with no vCPUs/MemoryGiB, which SkyPilot needs to launch them (2 azure)"]


def test_export_writes_each_clouds_own_header(sky_home, tmp_path):
    catalog.export_sky(catalog.load_offers(sky_home), tmp_path)
    for cloud in CLOUDS:
        with open(tmp_path / cloud / "vms.csv", newline="", encoding="utf-8") as f:
            assert next(csv.reader(f)) == next(csv.reader(open(FIXTURES / cloud / "vms.csv", encoding="utf-8")))


# --- cross-check with SkyPilot's own catalog code -------------------------------------------

_SKYPILOT_LISTING = """
import json, sys
from sky import catalog
rows = []
for cloud in sys.argv[1:]:
    for gpu, infos in catalog.list_accelerators(gpus_only=True, clouds=cloud, all_regions=True).items():
        rows += [[cloud, i.instance_type, i.region, gpu, i.accelerator_count, i.price, i.spot_price] for i in infos]
print(json.dumps(rows))
"""
needs_skypilot = pytest.mark.skipif(importlib.util.find_spec("sky") is None, reason="needs skypilot installed")


def _price_key(value):
    """SkyPilot reports "none" as NaN (and Vast's as 0.0); compare prices to 6 decimals."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or float(value) == 0:
        return None
    return round(float(value), 6)


def _skypilot_listing(runtime_dir: Path, clouds) -> list[tuple]:
    """What SkyPilot itself lists from the catalogs under runtime_dir (own process: SkyPilot
    fixes its catalog dir at import)."""
    env = {**os.environ, "SKY_RUNTIME_DIR": str(runtime_dir)}
    done = subprocess.run([sys.executable, "-c", _SKYPILOT_LISTING, *clouds], env=env, capture_output=True,
                          text=True, timeout=300, cwd=runtime_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    return sorted((c, it, r, g, int(n), _price_key(p), _price_key(sp)) for c, it, r, g, n, p, sp in json.loads(done.stdout))


def _our_listing(offers) -> list[tuple]:
    return sorted((o.provider, o.instance_type, o.region, o.gpu, o.gpu_count, _price_key(o.price_on_demand),
                   _price_key(o.price_spot)) for o in offers)


@needs_skypilot
def test_reader_prices_every_offer_as_skypilot_does(sky_home):
    # GCP included: SkyPilot's list_accelerators adds the host row to the accelerator row too.
    assert _our_listing(read_sky_catalog(sky_home)) == _skypilot_listing(sky_home.parents[2], CLOUDS)


@needs_skypilot
def test_skypilot_reads_the_exported_catalog_as_the_same_offers(sky_home, tmp_path):
    offers = catalog.load_offers(sky_home)  # SkyPilot's excerpts plus bundled azure and gcp rows
    catalog.export_sky(offers, tmp_path / "runtime" / ".sky" / "catalogs" / "v8")
    assert _skypilot_listing(tmp_path / "runtime", sorted({o.provider for o in offers})) == _our_listing(offers)


_SKYPILOT_LAUNCH_PRICES = """
import json, sys
import sky
from sky import catalog
out = []
for cloud, region, zone, instance_type, gpu, count, spot in json.loads(sys.argv[1]):
    hourly = catalog.get_hourly_cost(instance_type, spot, region, zone, clouds=cloud)
    if cloud == "gcp":  # GCP prices the host VM and its GPUs on separate rows
        hourly += catalog.get_accelerator_hourly_cost(gpu, count, spot, region, zone, clouds=cloud)
    vcpus, memory = catalog.get_vcpus_mem_from_instance_type(instance_type, clouds=cloud)
    resources = sky.Resources(infra=f"{cloud}/{region}" + (f"/{zone}" if zone else ""),
                              instance_type=instance_type, accelerators={gpu: count}, use_spot=spot)
    out.append([hourly, vcpus, memory, resources.get_cost(3600)])
print(json.dumps(out))
"""

# One launchable offer per cloud SkyPilot lists in the bundled snapshot, spot and on-demand.
_LAUNCH_CASES = [
    ("aws", "us-east-1", "p4d.24xlarge", True), ("aws", "us-east-1", "p4d.24xlarge", False),
    ("azure", "eastus", "Standard_ND96isr_H100_v5", False), ("azure", "eastus", "Standard_NC24ads_A100_v4", False),
    ("gcp", "us-central1", "a2-highgpu-1g", True), ("gcp", "us-central1", "g2-standard-4", False),
    ("lambda", "us-east-1", "gpu_1x_h100_pcie", False), ("nebius", "eu-north1", "gpu-h100-sxm_1gpu-16vcpu-200gb", True),
    ("runpod", "US", "1x_H100_SECURE", True), ("verda", "FIN-02", "1H100.80S.32V", True),
]


@needs_skypilot
def test_skypilot_launches_exported_bundled_offers_at_the_planners_price(tmp_path):
    """The issue's promise: the planner and SkyPilot's optimizer see the same prices. SkyPilot's
    own catalog code, over `export_sky` of the bundled snapshot, prices each instance as we do and
    can build a launchable sky.Resources for it (it needs the host's vCPUs and memory)."""
    bundled = catalog.load_offers(include_sky=False)
    v8 = tmp_path / "runtime" / ".sky" / "catalogs" / "v8"
    catalog.export_sky(bundled, v8)
    write_accelerator_index(v8)
    offers = []
    for provider, region, instance_type, spot in _LAUNCH_CASES:
        found = [o for o in bundled if (o.provider, o.region, o.instance_type) == (provider, region, instance_type)
                 and o.price(spot) is not None]
        assert found, (provider, region, instance_type, spot)
        offers.append((found[0], spot))
    cases = [[o.provider, o.region, o.zone, o.instance_type, o.gpu, o.gpu_count, spot] for o, spot in offers]
    env = {**os.environ, "SKY_RUNTIME_DIR": str(tmp_path / "runtime")}
    done = subprocess.run([sys.executable, "-c", _SKYPILOT_LAUNCH_PRICES, json.dumps(cases)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    for (o, spot), (hourly, vcpus, memory, cost_of_an_hour) in zip(offers, json.loads(done.stdout)):
        assert round(hourly, 6) == round(float(o.price(spot)), 6), (o, spot)
        assert round(cost_of_an_hour, 6) == round(float(o.price(spot)), 6), (o, spot)
        assert (vcpus, memory) == (o.vcpus, o.memory_gib), o


# --- CLI ----------------------------------------------------------------------------------

def run_cli(*args):
    from orchestrator.cli import app

    # A wide terminal: at 80 columns the table drops its instance column (--json keeps it).
    return CliRunner().invoke(app, ["catalog", *args], env={"COLUMNS": "160"})


def test_cli_filters_by_gpu_and_provider_sorted_by_price_per_gpu_hour(sky_home):
    result = run_cli("--gpu", "h100", "--provider", "runpod", "--json")
    assert result.exit_code == 0, result.stderr
    offers = json.loads(result.stdout)["offers"]
    assert offers and {(o["gpu"], o["provider"]) for o in offers} == {("H100", "runpod")}
    per_gpu = [o["price_per_gpu_hour"] for o in offers]
    assert per_gpu == sorted(per_gpu)


def test_cli_spot_lists_only_offers_with_a_spot_market(sky_home):
    offers = json.loads(run_cli("--spot", "--json").stdout)["offers"]
    assert offers and all(o["price_spot"] is not None for o in offers)
    assert not [o for o in offers if o["provider"] in ("vast", "lambda")]
    assert [o["price_per_gpu_hour"] for o in offers] == sorted(o["price_per_gpu_hour"] for o in offers)


def test_cli_region_and_max_price(sky_home):
    offers = json.loads(run_cli("--region", "us-east-1", "--max-price", "2", "--json").stdout)["offers"]
    assert offers and all(o["region"] == "us-east-1" and Decimal(o["price_on_demand"]) <= 2 for o in offers)


def test_cli_table_shows_prices_and_sources(sky_home):
    result = run_cli("--gpu", "A10G", "--no-sky")
    assert result.exit_code == 0
    assert "g5.xlarge" in result.stdout and "$/GPU-h" in result.stdout and "bundled" in result.stdout


@pytest.mark.parametrize("flag, value, kind", [("--gpu", "X100", "GPU"), ("--provider", "hetzner", "provider")])
def test_cli_unknown_name_is_one_line_listing_known_names_exit_2(sky_home, flag, value, kind):
    result = run_cli(flag, value)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: unknown {kind} '{value}'")
    assert ("H100" if kind == "GPU" else "runpod") in lines[0]
    assert result.stdout == ""


def test_cli_export_sky_writes_vms_csv_per_cloud(sky_home, tmp_path):
    result = run_cli("--gpu", "L40S", "--json", "--export-sky", str(tmp_path / "out"))
    assert result.exit_code == 0
    listed = json.loads(result.stdout)["offers"]
    exported = read_sky_catalog(tmp_path / "out")
    assert len(exported) == len(listed) and {o.gpu for o in exported} == {"L40S"}
