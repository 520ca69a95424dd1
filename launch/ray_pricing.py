"""What the Ray nodes a job runs on cost per hour, from what Ray reports of its cluster.

Ray knows nothing of money, so the price comes from the names a node reports (`ray.nodes()`):
- its labels: `instance-type` or `node.kubernetes.io/instance-type` (a cloud instance type,
  set by whoever starts the node with `ray start --labels`), `ray.io/node-group` (Ray sets it from
  RAY_NODE_TYPE_NAME: the autoscaler's node type, KubeRay's worker group) and
  `ray.io/accelerator-type` (Ray's own accelerator detection);
- its `accelerator_type:<X>` resource (the same detection, on nodes started without labels).

A node is priced by, in order: the spec's `ray.price_per_node_hour[<name>]` for any of its names;
the catalog, when a name is a cloud instance type it lists; `ray.price_per_node_hour.default`.
Otherwise pricing fails with one line naming the node type and the field to set, so a Ray job is
never recorded at $0 by accident: $0 only where the user wrote 0, and the lines then say so.

The catalog is the orchestrator's (launch may not import it): the caller passes it as a mapping
{instance type: on-demand USD/h of the whole instance}, e.g. built from
`orchestrator.catalog.load_offers()`. A catalog price of 0 counts as unknown.

Which nodes: Ray Train places one worker per GPU (use_gpu) or per CPU, packing them onto as few
nodes as it can, so the nodes priced are the fewest alive nodes with enough slots, most slots
first (ties by node id, so the answer does not depend on the order Ray lists them). The head
counts like any node: Ray schedules workers there when it has the slots. A node the job touches
is paid for whole.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from decimal import Decimal
from typing import Mapping, Optional

from contract.backend import BackendError

INSTANCE_TYPE_LABELS = ("instance-type", "node.kubernetes.io/instance-type")
NODE_GROUP_LABEL = "ray.io/node-group"
ACCELERATOR_LABEL = "ray.io/accelerator-type"
ACCELERATOR_RESOURCE = "accelerator_type:"
DEFAULT = "default"
UNLABELLED = "unlabelled"


@dataclass(frozen=True)
class RayPrice:
    price_per_hour: Decimal   # what the nodes this job uses cost per hour, all together
    num_nodes: int
    node_type: str            # the instance type / node type priced, or "mixed"
    lines: tuple[str, ...]    # how it was priced, one line per node type, for a person


def node_names(node: dict) -> tuple[str, ...]:
    """The names a Ray node goes by, most specific first (an instance type before an accelerator)."""
    labels = node.get("Labels") or {}
    names = [labels.get(key) for key in (*INSTANCE_TYPE_LABELS, NODE_GROUP_LABEL, ACCELERATOR_LABEL)]
    names += sorted(key[len(ACCELERATOR_RESOURCE):] for key in node.get("Resources") or {}
                    if key.startswith(ACCELERATOR_RESOURCE))
    return tuple(dict.fromkeys(name for name in names if name))


def _slots(node: dict, use_gpu: bool) -> int:
    return int((node.get("Resources") or {}).get("GPU" if use_gpu else "CPU", 0))


def nodes_for(nodes: list[dict], world_size: int, use_gpu: bool) -> list[dict]:
    """The alive nodes that host `world_size` workers, one per slot, fewest nodes first."""
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    alive = sorted((n for n in nodes if n.get("Alive") and _slots(n, use_gpu) > 0),
                   key=lambda n: (-_slots(n, use_gpu), n.get("NodeID", "")))
    chosen, slots = [], 0
    for node in alive:
        if slots >= world_size:
            break
        chosen.append(node)
        slots += _slots(node, use_gpu)
    if slots < world_size:
        unit = "GPU" if use_gpu else "CPU"
        raise BackendError(f"the Ray cluster has {slots} {unit}s on {len(alive)} alive nodes; "
                           f"the job needs {world_size} workers, one {unit} each")
    return chosen


def _node_price(node: dict, prices: Mapping[str, float],
                catalog: Optional[Mapping[str, Decimal]]) -> tuple[str, Decimal, str]:
    """(node type, USD/h, where the price came from) for one node."""
    names = node_names(node)
    for name in names:
        if name in prices and name != DEFAULT:
            return name, _price(prices[name]), f"ray.price_per_node_hour.{name}"
    for name in names:
        if catalog and catalog.get(name):
            return name, Decimal(str(catalog[name])), "the catalog's on-demand price"
    node_type = names[0] if names else UNLABELLED
    if DEFAULT in prices:
        return node_type, _price(prices[DEFAULT]), f"ray.price_per_node_hour.{DEFAULT}"
    if names:
        raise BackendError(f"no price for Ray node type {node_type!r}: set ray.price_per_node_hour.{node_type} "
                           f"(or ray.price_per_node_hour.default) in the spec")
    raise BackendError(f"no price for the Ray node at {node.get('NodeManagerAddress', '?')}, which reports no "
                       f"instance type, node group or accelerator: set ray.price_per_node_hour.default in the spec")


def _price(value: float) -> Decimal:
    # The digits the user wrote, not the float's binary expansion; the spec refuses a negative one.
    return Decimal(str(value))


def price_ray_cluster(nodes: list[dict], ray_spec, world_size: int, use_gpu: bool,
                      catalog: Optional[Mapping[str, Decimal]] = None) -> RayPrice:
    """Price the nodes of a Ray cluster (`ray.nodes()`) that a job of `world_size` workers uses.

    ray_spec: the spec's `ray` section (contract.spec.RaySpec); None prices as an empty one.
    catalog: {instance type: on-demand USD/h}, or None where the caller has no catalog.
    """
    prices = dict(ray_spec.price_per_node_hour) if ray_spec is not None else {}
    priced = [_node_price(node, prices, catalog) for node in nodes_for(nodes, world_size, use_gpu)]
    lines = []
    for (node_type, price, source), count in Counter(priced).items():  # first-seen order
        if price == 0:
            lines.append(f"{count} x {node_type} priced at $0/h: {source} is 0")
        else:
            lines.append(f"{count} x {node_type} at ${price}/h = ${price * count}/h ({source})")
    types = {node_type for node_type, _, _ in priced}
    return RayPrice(price_per_hour=sum((price for _, price, _ in priced), Decimal(0)), num_nodes=len(priced),
                    node_type=types.pop() if len(types) == 1 else "mixed", lines=tuple(lines))
