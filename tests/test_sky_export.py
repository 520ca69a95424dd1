"""`spotune catalog --export-sky` never leaves SkyPilot a partial catalog: prices merge into the
vms.csv SkyPilot downloaded, whose CPU rows place its jobs controller; SkyPilot's own catalog code
(in a process of its own: it fixes its catalog dir at import) checks the result."""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from decimal import Decimal
from pathlib import Path

from sky_catalog import write_accelerator_index
from typer.testing import CliRunner

from orchestrator import catalog
from orchestrator.catalog.sky import read_sky_catalog

FIXTURES = Path(__file__).parent / "fixtures"
GPU_ROWS = FIXTURES / "sky_catalog"            # SkyPilot catalog excerpts (provenance in their README)
CPU_ROWS = FIXTURES / "sky" / "cpu_rows"       # m6i.xlarge: where SkyPilot puts its jobs controller on AWS

_ASK_SKYPILOT = """
import json, sys
from sky import catalog
from sky.jobs import constants
controller = constants.CONTROLLER_RESOURCES
out = {"controller": catalog.get_default_instance_type(cpus=controller["cpus"], memory=controller["memory"], clouds="aws"),
       "prices": [catalog.get_hourly_cost(i, s, r, None, clouds=c) + (catalog.get_accelerator_hourly_cost(g, n, s, r, z, clouds=c) if c == "gcp" else 0)
                  for c, i, r, z, g, n, s in json.loads(sys.argv[1])]}
print(json.dumps(out))
"""


def whole_aws_catalog(runtime: Path) -> Path:
    """${SKY_RUNTIME_DIR}/.sky/catalogs/v8 as SkyPilot downloaded it: GPU and CPU rows of aws, and gcp."""
    v8 = runtime / ".sky" / "catalogs" / "v8"
    (v8 / "aws").mkdir(parents=True)
    gpu = (GPU_ROWS / "aws" / "vms.csv").read_text()
    cpu = (CPU_ROWS / "aws" / "vms.csv").read_text().split("\n", 1)[1]
    (v8 / "aws" / "vms.csv").write_text(gpu.rstrip("\n") + "\n" + cpu)
    (v8 / "gcp").mkdir()
    shutil.copyfile(GPU_ROWS / "gcp" / "vms.csv", v8 / "gcp" / "vms.csv")
    write_accelerator_index(v8)
    return v8


def ask_skypilot(runtime: Path, cases=()) -> dict:
    env = {**os.environ, "SKY_RUNTIME_DIR": str(runtime)}
    done = subprocess.run([sys.executable, "-c", _ASK_SKYPILOT, json.dumps(list(cases))], env=env, capture_output=True,
                          text=True, timeout=300, cwd=runtime)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_an_export_merged_into_skypilots_catalog_keeps_the_controllers_instance_and_prices_the_offers(tmp_path):
    runtime = tmp_path / "runtime"
    v8 = whole_aws_catalog(runtime)
    before = rows(v8 / "aws" / "vms.csv")
    g5 = [o for o in read_sky_catalog(v8) if o.provider == "aws" and o.instance_type == "g5.xlarge"]
    cheaper = [replace(o, price_on_demand=Decimal("0.5"), price_spot=Decimal("0.25")) for o in g5]
    written = catalog.export_sky(cheaper, v8, skypilots_dir=v8)
    assert written == [v8 / "aws" / "vms.csv"]
    after = rows(v8 / "aws" / "vms.csv")
    assert len(after) == len(before)  # prices changed in place, nothing dropped
    assert [r for r in after if r["InstanceType"] != "g5.xlarge"] == [r for r in before if r["InstanceType"] != "g5.xlarge"]
    cases = [("aws", o.instance_type, o.region, None, o.gpu, o.gpu_count, spot) for o in g5 for spot in (False, True)]
    answer = ask_skypilot(runtime, cases)
    assert answer["controller"] == "m6i.xlarge"
    assert answer["prices"] == [0.5, 0.25] * len(g5)


def test_a_catalog_of_the_offers_alone_is_what_would_leave_the_controller_nowhere(tmp_path):
    """Why the merge matters: the GPU rows alone, as the export used to write them."""
    runtime = tmp_path / "runtime"
    v8 = runtime / ".sky" / "catalogs" / "v8"
    catalog.export_sky([o for o in read_sky_catalog(GPU_ROWS) if o.provider == "aws"], v8, skypilots_dir=tmp_path / "elsewhere")
    write_accelerator_index(v8)
    assert ask_skypilot(runtime)["controller"] is None


def test_a_cloud_skypilot_has_not_downloaded_is_never_written_into_its_catalog_dir(tmp_path, caplog):
    runtime = tmp_path / "runtime"
    v8 = whole_aws_catalog(runtime)
    lambda_offers = [o for o in read_sky_catalog(GPU_ROWS) if o.provider == "lambda"][:3]
    with caplog.at_level(logging.WARNING):
        written = catalog.export_sky(lambda_offers, v8, skypilots_dir=v8)
    assert written == [] and not (v8 / "lambda").exists()
    assert "skipped lambda: SkyPilot has not downloaded its lambda catalog yet" in caplog.text
    assert "run `sky gpus list --cloud lambda` once" in caplog.text


def test_gcp_gpus_are_repriced_on_their_accelerator_row_and_the_host_row_stays(tmp_path):
    runtime = tmp_path / "runtime"
    v8 = whole_aws_catalog(runtime)
    before = rows(v8 / "gcp" / "vms.csv")
    a100 = next(o for o in read_sky_catalog(v8) if o.provider == "gcp" and o.instance_type == "a2-highgpu-1g"
                and o.region == "us-central1")
    new = replace(a100, price_on_demand=a100.price_on_demand + Decimal("1"), price_spot=None)
    catalog.export_sky([new], v8, skypilots_dir=v8)
    after = rows(v8 / "gcp" / "vms.csv")
    hosts = lambda table: [r for r in table if r["InstanceType"]]  # noqa: E731
    assert hosts(after) == hosts(before)
    answer = ask_skypilot(runtime, [("gcp", new.instance_type, new.region, new.zone, new.gpu, new.gpu_count, False)])
    assert round(answer["prices"][0], 6) == round(float(new.price_on_demand), 6)


def test_the_cli_merges_into_skypilots_catalog_and_says_what_it_skipped(tmp_path, monkeypatch):
    from orchestrator.cli import app

    runtime = tmp_path / "runtime"
    v8 = whole_aws_catalog(runtime)
    monkeypatch.setenv("SKY_RUNTIME_DIR", str(runtime))
    result = CliRunner().invoke(app, ["catalog", "--no-sky", "--export-sky", str(v8), "--json"])
    assert result.exit_code == 0, result.stderr
    assert f"wrote {v8 / 'aws' / 'vms.csv'}" in result.stderr
    assert "skipped azure: SkyPilot has not downloaded its azure catalog yet" in result.stderr
    assert not (v8 / "azure").exists()
    assert ask_skypilot(runtime)["controller"] == "m6i.xlarge"
