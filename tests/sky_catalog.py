"""A SkyPilot runtime dir seeded with real catalog excerpts, for tests that use real sky objects.

SkyPilot fixes its catalog directory when `sky` is first imported and never re-fetches a vms.csv
that has no `.meta` md5 beside it, so seeding ${SKY_RUNTIME_DIR}/.sky/catalogs/v8 before the
import makes sky.Resources, sky.Task and sky.Optimizer work offline. The planner-side offers come
from the same files (orchestrator.catalog.read_sky_catalog), so both sides price the same rows.
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
import tempfile
from pathlib import Path

CATALOG = Path(__file__).parent / "fixtures" / "sky" / "catalog" / "v8"
# The clouds without bucket mounts (and nebius), from the catalog excerpts of tests/fixtures/sky_catalog:
# seeded too, so SkyPilot builds their resources, but left out of catalog_offers() (see other_offers()).
MORE_CLOUDS = Path(__file__).parent / "fixtures" / "sky_catalog"
MORE_CLOUD_NAMES = ("runpod", "vast", "verda", "nebius")


def sky_with_seeded_catalog():
    """Import sky with its catalog seeded from tests/fixtures/sky/catalog (once per process).

    SKY_RUNTIME_DIR is set only for the import, then restored, so other tests' default catalog
    (orchestrator.catalog.load_offers) is not changed by these; use `seeded_runtime()` with
    monkeypatch.setenv inside the SkyPilot tests."""
    if "sky" not in sys.modules:
        runtime = Path(tempfile.mkdtemp(prefix="spotune-sky-"))
        target = runtime / ".sky" / "catalogs" / "v8"
        shutil.copytree(CATALOG, target, ignore=shutil.ignore_patterns("*.md"))
        for cloud in MORE_CLOUD_NAMES:
            (target / cloud).mkdir()
            shutil.copyfile(MORE_CLOUDS / cloud / "vms.csv", target / cloud / "vms.csv")
        write_accelerator_index(target)
        os.environ["SPOTUNE_TEST_SKY_RUNTIME"] = str(runtime)
        previous = os.environ.get("SKY_RUNTIME_DIR")
        os.environ["SKY_RUNTIME_DIR"] = str(runtime)
        try:
            import sky  # noqa: F401  (fixes its catalog dir now)
            from sky.catalog import common  # noqa: F401
        finally:
            if previous is None:
                os.environ.pop("SKY_RUNTIME_DIR", None)
            else:
                os.environ["SKY_RUNTIME_DIR"] = previous
    import sky
    from sky.catalog import common

    seeded = os.environ.get("SPOTUNE_TEST_SKY_RUNTIME")
    if not seeded or not str(common._ABSOLUTE_VERSIONED_CATALOG_DIR).startswith(seeded):
        raise RuntimeError("sky was imported before its catalog could be seeded; "
                           "import tests/sky_catalog.py's sky_with_seeded_catalog() first")
    return sky


def write_accelerator_index(catalog_dir: Path) -> None:
    """common/accelerators.csv: which clouds list each accelerator name. SkyPilot downloads this
    derived file to canonicalize GPU names; here it is derived from the seeded files instead."""
    clouds_of: dict[str, set[str]] = {}
    display = {"aws": "AWS", "gcp": "GCP", "azure": "Azure", "lambda": "Lambda", "runpod": "RunPod",
               "vast": "Vast", "nebius": "Nebius", "verda": "Verda"}
    for vms in sorted(catalog_dir.glob("*/vms.csv")):
        with open(vms, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                if row.get("AcceleratorName"):
                    clouds_of.setdefault(row["AcceleratorName"], set()).add(display[vms.parent.name])
    (catalog_dir / "common").mkdir(exist_ok=True)
    with open(catalog_dir / "common" / "accelerators.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["AcceleratorName", "Clouds"])
        for name, clouds in sorted(clouds_of.items()):
            writer.writerow([name, str(sorted(clouds))])


def seeded_runtime() -> str:
    return os.environ["SPOTUNE_TEST_SKY_RUNTIME"]


def catalog_offers():
    from orchestrator.catalog import read_sky_catalog

    return list(read_sky_catalog(CATALOG))


def other_offers(*clouds: str):
    """Offers of the seeded clouds catalog_offers() leaves out (runpod, vast, verda, nebius)."""
    from orchestrator.catalog.sky import read_vms_csv

    return [o for cloud in clouds for o in read_vms_csv(MORE_CLOUDS / cloud / "vms.csv", cloud)]
