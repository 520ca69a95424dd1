"""Training across N nodes of one instance type: speed, and what the plan says about its figures.

    tokens/s of N nodes = one node's tokens/s x N x inter-node efficiency(N)
    inter-node efficiency(N) = per_doubling ** log2(N)          (calibration.yaml scaling.inter_node)

One node's tokens/s is throughput.py's: the per-GPU rate x G GPUs x the intra-node efficiency
(throughput.multi_gpu_efficiency), so each factor is kept once. Memory needs no figure here: the
planner sizes a multi-node run for its world size (N x G GPUs), over which FSDP shards a full
fine-tune's states while DDP keeps the whole frozen base of LoRA/QLoRA on every GPU
(memory.py, contract/execution.py sharding_for). Both scaling figures are assumptions until a
measured multi-GPU and multi-node run replaces them; `assumption_notes` is how a plan says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:   # orchestrator.estimate imports this package's figures; keep the cycle out of import time
    from orchestrator.estimate import Calibration
    from orchestrator.estimate.throughput import ThroughputEstimate


def inter_node_efficiency(num_nodes: int, cal: "Calibration") -> float:
    """The fraction of N x one node's speed that N nodes reach: exactly 1 on one node."""
    if num_nodes <= 1 or cal.inter_node is None:
        return 1.0
    return cal.inter_node.per_doubling ** math.log2(num_nodes)


@dataclass(frozen=True)
class NodesThroughput:
    """The speed of N nodes training one job; reads like ThroughputEstimate where the planner uses it."""

    node: "ThroughputEstimate"      # one node of the N, at its micro-batch
    num_nodes: int
    efficiency: float               # inter-node, per inter_node_efficiency
    assumed: bool = True

    @property
    def tokens_per_second(self) -> float:
        return self.node.tokens_per_second * self.num_nodes * self.efficiency

    def formula(self) -> str:
        assumed = ", assumed" if self.assumed else ""
        return (f"one node: {self.node.formula()}; x {self.num_nodes} nodes x {self.efficiency:.3g} inter-node "
                f"scaling{assumed} = {self.tokens_per_second:,.0f} tokens/s")


def across_nodes(node: "ThroughputEstimate", num_nodes: int, cal: "Calibration"):
    """One node's estimate as is, or N nodes' (NodesThroughput)."""
    if num_nodes <= 1:
        return node
    assumed = cal.inter_node.assumed if cal.inter_node is not None else True
    return NodesThroughput(node, num_nodes, inter_node_efficiency(num_nodes, cal), assumed)


def assumption_notes(gpu_count: int, num_nodes: int, cal: "Calibration") -> list[str]:
    """What a quote on N nodes of G GPUs assumes about scaling, one line per factor that applies:
    'inter-node scaling 0.9 per doubling (0.81 on 4 nodes): assumed, not measured'."""
    notes = []
    if gpu_count > 1:
        state = "assumed, not measured" if cal.multi_gpu_assumed else "measured"
        notes.append(f"intra-node scaling {cal.scaling(gpu_count):g} on {gpu_count} GPUs "
                     f"(throughput.multi_gpu_efficiency): {state}")
    if num_nodes > 1 and cal.inter_node is not None:
        state = "assumed, not measured" if cal.inter_node.assumed else "measured"
        notes.append(f"inter-node scaling {cal.inter_node.per_doubling:g} per doubling "
                     f"({inter_node_efficiency(num_nodes, cal):.3g} on {num_nodes} nodes; scaling.inter_node): {state}")
    return notes
