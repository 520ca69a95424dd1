"""A Ray job is priced from what Ray reports of its cluster: the nodes that host its workers, each
priced by the spec's `ray.price_per_node_hour`, the catalog, or the spec's default, and never at
$0 unless the user wrote 0.

The records are `ray.nodes()` records: one test takes them from a real local Ray node, and the
rest build them with `ray_node`, whose keys that test checks against the real ones."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from decimal import Decimal

import pytest
from pydantic import ValidationError

from contract.backend import BackendError
from contract.spec import RaySpec
from launch.ray_pricing import RayPrice, node_names, price_ray_cluster
from orchestrator.catalog import load_offers

# A real node started with `RAY_NODE_TYPE_NAME` (what the autoscaler and KubeRay set) and an
# instance-type label, as `ray start --labels` gives it; `address="local"` so the test never
# joins another Ray cluster running on this machine.
REAL_NODES = """
import json, ray
ray.init(address="local", num_cpus=1, include_dashboard=False, labels={"instance-type": "g5.xlarge"},
         _temp_dir=%r)
print("NODES " + json.dumps(ray.nodes()))
ray.shutdown()
"""


@pytest.fixture(scope="module")
def real_nodes() -> list[dict]:
    temp_dir = tempfile.mkdtemp(prefix="rp-", dir="/tmp")  # short: Ray's socket paths have a limit
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_NODE_TYPE_NAME": "gpu-workers"}
    env.pop("RAY_ADDRESS", None)
    try:
        done = subprocess.run([sys.executable, "-c", REAL_NODES % temp_dir], env=env, capture_output=True,
                              text=True, timeout=120)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("NODES "))
    return json.loads(line[len("NODES "):])


def ray_node(node_id: str, cpus: float = 8, gpus: float = 0, labels: dict | None = None,
             resources: dict | None = None, alive: bool = True, head: bool = False,
             address: str = "10.0.0.1") -> dict:
    """A `ray.nodes()` record with the keys Ray 2.60 gives (checked against a real one below)."""
    total = {"CPU": float(cpus), f"node:{address}": 1.0, "memory": 6.4e10, "object_store_memory": 2.0e10,
             **({"GPU": float(gpus)} if gpus else {}), **({"node:__internal_head__": 1.0} if head else {}),
             **(resources or {})}
    return {"NodeID": node_id, "Alive": alive, "alive": alive, "NodeManagerAddress": address,
            "NodeManagerHostname": f"host-{node_id}", "NodeManagerPort": 40000, "ObjectManagerPort": 40001,
            "ObjectStoreSocketName": "/tmp/ray/sockets/plasma_store", "RayletSocketName": "/tmp/ray/sockets/raylet",
            "MetricsExportPort": 40002, "MetricsAgentPort": 40003, "DashboardAgentListenPort": 52365,
            "NodeName": address, "RuntimeEnvAgentPort": 40004, "DeathReason": 0, "DeathReasonMessage": "",
            "Resources": total, "Labels": {"ray.io/node-id": node_id, **(labels or {})}}


def spec(**prices: float) -> RaySpec:
    return RaySpec(price_per_node_hour=prices)


# --- a real node ----------------------------------------------------------------------------------

def test_the_fixture_records_have_the_keys_a_real_ray_node_reports(real_nodes):
    [real] = real_nodes
    fixture = ray_node("n1", head=True)
    assert set(fixture) == set(real)
    own_address = {"node:10.0.0.1", f"node:{real['NodeManagerAddress']}"}
    assert set(fixture["Resources"]) - own_address == set(real["Resources"]) - own_address
    assert real["Labels"]["ray.io/node-group"] == "gpu-workers"  # where RAY_NODE_TYPE_NAME lands


def test_a_real_node_is_priced_by_its_labels_and_refused_without_a_price(real_nodes):
    assert node_names(real_nodes[0]) == ("g5.xlarge", "gpu-workers")
    by_group = price_ray_cluster(real_nodes, spec(**{"gpu-workers": 1.25}), world_size=1, use_gpu=False)
    assert by_group == RayPrice(Decimal("1.25"), 1, "gpu-workers",
                                ("1 x gpu-workers at $1.25/h = $1.25/h (ray.price_per_node_hour.gpu-workers)",))
    by_default = price_ray_cluster(real_nodes, spec(default=0.5), world_size=1, use_gpu=False)
    assert (by_default.price_per_hour, by_default.node_type) == (Decimal("0.5"), "g5.xlarge")
    with pytest.raises(BackendError, match=r"^no price for Ray node type 'g5.xlarge': set "
                                           r"ray.price_per_node_hour.g5.xlarge \(or ray.price_per_node_hour.default\)"):
        price_ray_cluster(real_nodes, spec(), world_size=1, use_gpu=False)


def test_a_real_node_cannot_host_more_workers_than_it_has_cpus(real_nodes):
    with pytest.raises(BackendError, match=r"^the Ray cluster has 1 CPUs on 1 alive nodes; the job needs 2 workers"):
        price_ray_cluster(real_nodes, spec(default=0.5), world_size=2, use_gpu=False)
    with pytest.raises(BackendError, match=r"has 0 GPUs on 0 alive nodes"):
        price_ray_cluster(real_nodes, spec(default=0.5), world_size=1, use_gpu=True)


# --- how a node is named and priced --------------------------------------------------------------

def test_a_node_goes_by_its_instance_type_then_node_group_then_accelerator():
    node = ray_node("n1", gpus=8, labels={"node.kubernetes.io/instance-type": "p4d.24xlarge",
                                          "ray.io/node-group": "a100-group", "ray.io/accelerator-type": "A100"},
                    resources={"accelerator_type:A100": 1.0})
    assert node_names(node) == ("p4d.24xlarge", "a100-group", "A100")
    assert node_names(ray_node("n2", gpus=1, resources={"accelerator_type:L4": 1.0})) == ("L4",)
    assert node_names(ray_node("n3")) == ()


def test_an_explicit_price_for_any_of_its_names_beats_the_catalog_and_the_default():
    node = ray_node("n1", gpus=8, labels={"instance-type": "p4d.24xlarge", "ray.io/accelerator-type": "A100"})
    catalog = {"p4d.24xlarge": Decimal("21.95764")}
    priced = price_ray_cluster([node], spec(A100=12.5, default=99), 8, True, catalog=catalog)
    assert (priced.price_per_hour, priced.node_type) == (Decimal("12.5"), "A100")
    assert priced.lines == ("1 x A100 at $12.5/h = $12.5/h (ray.price_per_node_hour.A100)",)


def test_an_accelerator_resource_alone_names_the_node_type():
    node = ray_node("n1", gpus=4, resources={"accelerator_type:L4": 1.0})
    priced = price_ray_cluster([node], spec(L4=2.1), 4, True)
    assert (priced.price_per_hour, priced.node_type, priced.num_nodes) == (Decimal("2.1"), "L4", 1)


def test_a_cloud_instance_type_is_priced_from_the_catalog():
    offers = [o for o in load_offers(include_sky=False) if o.price_on_demand]
    # As a caller builds it: each instance type at the lowest on-demand price the catalog lists.
    catalog = {}
    for o in sorted(offers, key=lambda o: o.price_on_demand, reverse=True):
        catalog[o.instance_type] = o.price_on_demand
    nodes = [ray_node(f"n{i}", cpus=96, gpus=8, labels={"instance-type": "p4d.24xlarge"}, address=f"10.0.0.{i}")
             for i in (1, 2)]
    priced = price_ray_cluster(nodes, spec(default=1), world_size=16, use_gpu=True, catalog=catalog)
    each = catalog["p4d.24xlarge"]
    assert (priced.price_per_hour, priced.num_nodes, priced.node_type) == (2 * each, 2, "p4d.24xlarge")
    assert priced.lines == (f"2 x p4d.24xlarge at ${each}/h = ${2 * each}/h (the catalog's on-demand price)",)


def test_a_catalog_price_of_zero_is_no_price():
    node = ray_node("n1", gpus=1, labels={"instance-type": "free.tier"})
    with pytest.raises(BackendError, match="ray.price_per_node_hour.free.tier"):
        price_ray_cluster([node], spec(), 1, True, catalog={"free.tier": Decimal(0)})


def test_an_unlabelled_node_without_a_default_names_the_field_to_set():
    with pytest.raises(BackendError) as e:
        price_ray_cluster([ray_node("n1", address="10.1.2.3")], spec(other=1), 1, False)
    assert str(e.value) == ("no price for the Ray node at 10.1.2.3, which reports no instance type, node group "
                            "or accelerator: set ray.price_per_node_hour.default in the spec")
    assert "\n" not in str(e.value)


def test_zero_is_allowed_only_when_written_and_then_said():
    free = price_ray_cluster([ray_node("n1")], spec(default=0), 1, False)
    assert free == RayPrice(Decimal("0"), 1, "unlabelled",
                            ("1 x unlabelled priced at $0/h: ray.price_per_node_hour.default is 0",))
    node = ray_node("n1", gpus=2, labels={"ray.io/node-group": "on-prem"})
    assert price_ray_cluster([node], spec(**{"on-prem": 0}), 2, True).lines == (
        "1 x on-prem priced at $0/h: ray.price_per_node_hour.on-prem is 0",)


def test_a_negative_price_is_refused_by_the_spec():
    with pytest.raises(ValidationError, match=r"greater than or equal to 0"):
        spec(default=-1)


# --- which nodes the job uses --------------------------------------------------------------------

def test_workers_fill_the_most_capable_alive_nodes_first():
    nodes = [ray_node("small", gpus=2, labels={"ray.io/node-group": "l4x2"}),
             ray_node("dead", gpus=8, labels={"ray.io/node-group": "a100x8"}, alive=False),
             ray_node("big-b", gpus=8, labels={"ray.io/node-group": "a100x8"}),
             ray_node("big-a", gpus=8, labels={"ray.io/node-group": "a100x8"}),
             ray_node("cpu-only", cpus=64, labels={"ray.io/node-group": "cpu"})]
    prices = spec(a100x8=20, l4x2=1.5)
    assert price_ray_cluster(nodes, prices, 8, True) == RayPrice(
        Decimal("20"), 1, "a100x8", ("1 x a100x8 at $20.0/h = $20.0/h (ray.price_per_node_hour.a100x8)",))
    assert price_ray_cluster(nodes, prices, 16, True).num_nodes == 2
    mixed = price_ray_cluster(nodes, prices, 17, True)
    assert mixed == RayPrice(Decimal("41.5"), 3, "mixed",
                             ("2 x a100x8 at $20.0/h = $40.0/h (ray.price_per_node_hour.a100x8)",
                              "1 x l4x2 at $1.5/h = $1.5/h (ray.price_per_node_hour.l4x2)"))
    with pytest.raises(BackendError, match=r"^the Ray cluster has 18 GPUs on 3 alive nodes; the job needs 19"):
        price_ray_cluster(nodes, prices, 19, True)


def test_the_order_ray_lists_nodes_in_does_not_change_the_price():
    nodes = [ray_node("b", gpus=4, labels={"ray.io/node-group": "x"}),
             ray_node("a", gpus=4, labels={"ray.io/node-group": "y"})]
    prices = spec(x=3, y=4)
    assert price_ray_cluster(nodes, prices, 4, True) == price_ray_cluster(nodes[::-1], prices, 4, True)
    assert price_ray_cluster(nodes, prices, 4, True).node_type == "y"  # ties go to the lower node id


def test_the_head_hosts_workers_when_it_has_the_slots():
    head = ray_node("head", cpus=4, head=True, labels={"ray.io/node-group": "head"})
    worker = ray_node("worker", cpus=2, labels={"ray.io/node-group": "worker"})
    prices = spec(head=0.4, worker=0.2)
    assert price_ray_cluster([worker, head], prices, 4, False).lines == (
        "1 x head at $0.4/h = $0.4/h (ray.price_per_node_hour.head)",)
    assert price_ray_cluster([worker, head], prices, 6, False).price_per_hour == Decimal("0.6")
    # A GPU job skips a head without GPUs: it is not one of the nodes the job pays for.
    gpu_worker = ray_node("gpu", gpus=1, labels={"ray.io/node-group": "worker"})
    assert price_ray_cluster([head, gpu_worker], prices, 1, True).node_type == "worker"
