"""Memory per GPU of one training step: model states, activations, logits, runtime overhead.

The activation model follows the tensors autograd keeps for backward in transformers' Llama
layer (RMSNorm computed in fp32, SDPA attention, gated MLP) and PEFT's LoRA layers (adapters in
fp32, so each adapter keeps an fp32 copy of its input). Logits are fp32 over the vocabulary and
dominate small models. The figures that depend on the training loop (bytes per parameter, logits
bytes, QLoRA's fp32 upcast) come from calibration.yaml; tests/test_estimate.py holds the model
to every anchor run's measured peak within 15%.

Memory is counted in the dtype the recipe trains in on the device (bf16, or float32 on GPUs without
bf16: everything the bf16 figures count in 2 bytes takes 4) and for the sharding it runs
(contract/execution.py sharding_for): a full fine-tune's model states are sharded over the GPUs of
one instance (FSDP full shard), while LoRA/QLoRA under DDP keep the whole frozen base on every GPU,
plus DDP's bucket copy of the adapter gradients. Activations are per GPU, for its own micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from contract.execution import sharding_for
from orchestrator.estimate import GIB, Calibration
from orchestrator.architectures import LINEAR_MODULES, ModelArch

# Which projections read which tensor: q/k/v read the attention norm's output, gate/up the MLP norm's.
_ATTN_IN = ("q_proj", "k_proj", "v_proj")
_MLP_IN = ("gate_proj", "up_proj")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU at the step's peak; `peak_allocated` is what torch.cuda.max_memory_allocated reports."""

    weights: float
    gradients: float
    optimizer: float
    fsdp_buffers: float
    activations: float
    logits: float
    runtime: float
    micro_batch: int
    gradient_checkpointing: bool
    gpu_count: int
    context: float = 0.0          # the CUDA context, part of `runtime`
    sharding: str = "none"

    @property
    def peak_allocated(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.fsdp_buffers + self.activations + self.logits

    @property
    def total(self) -> float:
        return self.peak_allocated + self.runtime

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    @property
    def needs_free_gib(self) -> float:
        """What must be free on the GPU once the training process holds its CUDA context."""
        return (self.total - self.context) / GIB

    @property
    def activations_gib(self) -> float:
        """The part of needs_free_gib that grows with the micro-batch (with its share of allocator slack)."""
        grows = self.activations + self.logits
        slack = self.runtime - self.context
        return (grows + (slack * grows / self.peak_allocated if self.peak_allocated else 0.0)) / GIB

    def breakdown(self) -> list[tuple[str, float]]:
        """(item, GiB) lines, in the order --explain prints them."""
        return [(item, value / GIB) for item, value in (
            ("weights", self.weights), ("gradients", self.gradients), ("optimizer states", self.optimizer),
            ("DDP gradient buckets" if self.sharding == "ddp" else "FSDP gather buffers", self.fsdp_buffers),
            ("activations", self.activations),
            ("logits + loss", self.logits), ("runtime (CUDA context, allocator slack)", self.runtime))]


def _targets(target_modules) -> tuple[str, ...]:
    return LINEAR_MODULES if target_modules == "all-linear" else tuple(t for t in target_modules if t in LINEAR_MODULES)


def _qlora_upcast(method: str, cal: Calibration) -> bool:
    return method == "qlora" and cal.recipe.qlora_fp32_upcast


def _wide(method: str, dtype: str, cal: Calibration) -> bool:
    """Whether hidden states are fp32: training in float32, or QLoRA with the fp32 upcast."""
    return dtype == "float32" or _qlora_upcast(method, cal)


def _dtype_bytes(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def activation_bytes_per_token_layer(arch: ModelArch, method: str, target_modules, lora_dropout: float,
                                     cal: Calibration, dtype: str = "bfloat16") -> float:
    """Bytes one layer keeps for backward per token (no checkpointing)."""
    h, q, kv, i = arch.hidden, arch.q_dim, arch.kv_dim, arch.intermediate
    a = 4 if _wide(method, dtype, cal) else 2           # bytes of the residual stream / hidden states
    if method == "full":
        # per norm: fp32 copy (4h) + normalized input of the weight multiply (2h) + output read by the linears (2h)
        norms = 2 * (4 * h + 2 * h + 2 * h)
        attention = 2 * q + 4 * kv + 2 * q + 2 * q        # q, k, v, output (SDPA) + o_proj input
        mlp = 2 * i * 3 + 2 * i                           # SiLU input, its output, up output + down input
        return (norms + attention + mlp) * _dtype_bytes(dtype) / 2
    targets = _targets(target_modules)
    shapes = arch.projection_shapes()
    # Frozen base linears keep nothing; each adapter keeps its input in fp32 (PEFT casts it),
    # plus a dropout mask. When hidden states are already fp32 the cast is a no-op and shared.
    dropout_mask = 1 if lora_dropout > 0 else 0

    def adapter_inputs(names) -> float:
        hit = [n for n in names if n in targets]
        if not hit:
            return 0
        d_in = shapes[hit[0]][0]
        if a == 4 and not dropout_mask:
            return 4 * d_in
        return len(hit) * (4 + dropout_mask) * d_in

    norms = 2 * (4 * h)                                   # the fp32 copy each RMSNorm keeps
    attention = a * q + 2 * a * kv + a * q                # q, k, v, output kept by SDPA
    mlp = 3 * a * i                                       # SiLU input, its output, up output
    adapters = (adapter_inputs(_ATTN_IN) + adapter_inputs(("o_proj",)) + adapter_inputs(_MLP_IN)
                + adapter_inputs(("down_proj",)))
    return norms + attention + mlp + adapters


def model_state_bytes(arch: ModelArch, method: str, lora_r: int, target_modules, cal: Calibration,
                      dtype: str = "bfloat16") -> tuple[float, float, float]:
    """(weights, gradients, optimizer) bytes for the whole model, before sharding."""
    n = arch.params
    if method == "full":
        per_param = cal.recipe.full_bytes_per_param      # bf16 figures; AdamW's moments follow the weights' dtype
        widen = _dtype_bytes(dtype) / 2
        return n * per_param.weights * widen, n * per_param.gradients * widen, n * per_param.optimizer * widen
    adapter = arch.lora_params(lora_r, target_modules)
    per_adapter_param = cal.recipe.adapter_bytes_per_param
    if method == "lora":
        base = _dtype_bytes(dtype) * n
    else:
        quantized = arch.linear_params
        kept_bytes = 4 if _wide(method, dtype, cal) else 2
        base = (quantized * (cal.recipe.nf4_bytes_per_param + cal.recipe.nf4_constants_bytes_per_param)
                + (n - quantized) * kept_bytes)
    return (base + adapter * per_adapter_param.weights, adapter * per_adapter_param.gradients,
            adapter * per_adapter_param.optimizer)


def estimate_memory(arch: ModelArch, method: str, *, seq_len: int, micro_batch: int, gradient_checkpointing: bool,
                    gpu_count: int, cal: Calibration, lora_r: int = 16, target_modules="all-linear",
                    lora_dropout: float = 0.0, dtype: str = "bfloat16") -> MemoryEstimate:
    tokens = micro_batch * seq_len
    weights, grads, optim = model_state_bytes(arch, method, lora_r, target_modules, cal, dtype)
    sharding = sharding_for(method, gpu_count)
    sync = 0.0
    if sharding == "fsdp":
        weights, grads, optim = weights / gpu_count, grads / gpu_count, optim / gpu_count
        # FSDP gathers one layer's full weights and prefetches the next: two layers in the weights' dtype.
        sync = 2 * _dtype_bytes(dtype) * (arch.linear_params / arch.layers)
    elif sharding == "ddp":
        sync = grads        # DDP's buckets: a second copy of the (adapter) gradients, for the all-reduce
    per_layer = activation_bytes_per_token_layer(arch, method, target_modules, lora_dropout, cal, dtype) * tokens
    upcast = _wide(method, dtype, cal)
    per_token_vocab = cal.recipe.logits_bytes_per_token_vocab
    logits = (per_token_vocab.fp32_head if upcast else per_token_vocab.bf16_head) * arch.vocab * tokens
    if gradient_checkpointing:
        # Each layer keeps only its input; backward recomputes one layer at a time. The loss's
        # backward (logits peak) comes before any recompute, so the larger of the two sets the peak.
        kept = arch.layers * (4 if upcast else 2) * arch.hidden * tokens
        if per_layer > logits:
            kept, logits = kept + per_layer, 0.0
        activations = kept
    else:
        activations = arch.layers * per_layer
    allocated = weights + grads + optim + sync + activations + logits
    context = cal.runtime.cuda_context_gib * GIB
    runtime = allocated * cal.runtime.allocator_fragmentation + context
    return MemoryEstimate(weights, grads, optim, sync, activations, logits, runtime,
                          micro_batch, gradient_checkpointing, gpu_count, context, sharding)


@dataclass(frozen=True)
class BatchChoice:
    micro_batch: int
    gradient_checkpointing: bool
    memory: MemoryEstimate


def _micro_candidates(fixed: Optional[int], limit: int) -> list[int]:
    if fixed is not None:
        return [fixed]
    sizes, m = [], 1
    while m <= limit:
        sizes.append(m)
        m *= 2
    return sizes[::-1]


def choose_batch(arch: ModelArch, method: str, *, seq_len: int, global_batch: int, micro: Optional[int],
                 checkpointing: Optional[bool], gpu_count: int, vram_gb: Optional[float], cal: Calibration,
                 lora_r: int = 16, target_modules="all-linear", lora_dropout: float = 0.0,
                 memo: Optional[dict] = None, dtype: str = "bfloat16") -> tuple[Optional[BatchChoice], MemoryEstimate]:
    """The largest power-of-two micro-batch that fits (or the spec's fixed one), without gradient
    checkpointing when possible (it costs a recomputed forward). Returns (choice or None, the
    smallest configuration tried, for the "does not fit" detail). vram_gb None: nothing is checked.
    `memo`, keyed by (gpu_count, micro, checkpointing, dtype), shares estimates across GPU types of one job."""
    limit = max(1, global_batch // gpu_count)
    modes = [False, True] if checkpointing is None else [checkpointing]
    smallest = None
    memo = {} if memo is None else memo   # memory does not depend on the GPU: share it across GPU types
    for ckpt in modes:
        for mb in _micro_candidates(micro, limit):
            mem = memo.get((gpu_count, mb, ckpt, dtype))
            if mem is None:
                mem = memo[(gpu_count, mb, ckpt, dtype)] = estimate_memory(
                    arch, method, seq_len=seq_len, micro_batch=mb, gradient_checkpointing=ckpt, gpu_count=gpu_count,
                    cal=cal, lora_r=lora_r, target_modules=target_modules, lora_dropout=lora_dropout, dtype=dtype)
            if vram_gb is None or mem.total_gib <= vram_gb:
                return BatchChoice(mb, ckpt, mem), mem
            smallest = mem
    return None, smallest
