"""The model side of the recipe: load for the method, LoRA/QLoRA, packed attention, chunked loss.

Choices that the H100 anchors (docs/anchors/h100-naive-baseline.json) make matter:
- QLoRA keeps norms, embeddings and lm_head in the compute dtype. peft's
  `prepare_model_for_kbit_training` upcasts them to fp32, which cost 2.3x throughput and 21%
  more memory on an 8B model; we only enable input gradients for gradient checkpointing.
- The loss never materializes [tokens, vocab] logits in fp32: logits are computed for the target
  tokens only, a chunk at a time, and recomputed in backward (fp32 logits over a 128k vocabulary
  were what ran a 1B QLoRA out of memory).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from contract.spec import SpecError
from recipes.data import IGNORE_INDEX
from recipes.execution import DeviceFacts
from recipes.tiny import local_model_path

LOSS_CHUNK_TOKENS = 1024
FLASH = "flash_attention_2"


def compute_dtype(device: torch.device) -> torch.dtype:
    """The fallback's dtype (no `execution:` section); the planner makes the same choice, and
    prices GPUs without bf16 at their fp32 rate (contract/execution.py)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32  # CPU, and pre-Ampere GPUs (fp16 would need loss scaling)


def attention_implementation(device: torch.device, dtype: torch.dtype) -> str:
    # flash-attn reads document boundaries from position_ids (varlen kernels, no mask at all);
    # otherwise SDPA gets an explicit block-diagonal causal mask.
    if dtype in (torch.bfloat16, torch.float16) and flash_attention_available(device):
        return FLASH
    return "sdpa"


def flash_attention_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def torch_dtype(name: str) -> torch.dtype:
    """contract.execution's dtype name -> torch's."""
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def world_nodes(world_size: int) -> int:
    """Nodes the world spans: torchrun and Ray Train both set LOCAL_WORLD_SIZE (processes on this
    node); a world that does not split evenly is counted as one node."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size) or world_size)
    return world_size // local if local and world_size % local == 0 else 1


def device_facts(device: torch.device, world_size: int) -> DeviceFacts:
    """What this node has, for checking the plan's execution config (recipes/execution.py).
    Measured before the model loads: free memory then is what the plan's figures must fit."""
    nodes = world_nodes(world_size)
    if device.type != "cuda":
        return DeviceFacts("cpu", None, world_size, bf16=False, flash_attention=False, nodes=nodes)
    free, _total = torch.cuda.mem_get_info(device)
    if world_size > 1 and torch.distributed.is_initialized():
        # Every rank must run the same config: the GPU with the least free memory decides.
        least = torch.tensor([float(free)], device=device)
        torch.distributed.all_reduce(least, op=torch.distributed.ReduceOp.MIN)
        free = least.item()
    return DeviceFacts("cuda", torch.cuda.get_device_name(device), world_size, bf16=torch.cuda.is_bf16_supported(),
                       flash_attention=flash_attention_available(device), free_gib=free / 2**30, nodes=nodes)


def _probe_bitsandbytes(device: torch.device, dtype: torch.dtype) -> None:
    """Fail early, as bad input, where bitsandbytes cannot run NF4 on this device."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(torch.ones(64, 64, dtype=dtype, device=device), quant_type="nf4")
        bnbf.dequantize_4bit(packed, state)
    except Exception as e:  # ImportError, missing native library, no kernel for this device
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"method 'qlora' needs bitsandbytes 4-bit kernels, which do not run on "
                          f"{device.type} here ({detail}); use method 'lora' or a supported GPU") from None


def _cannot_load(cfg, error: Exception) -> SpecError:
    return SpecError(f"cannot load model '{cfg.model}': {' '.join(str(error).split())[:300]}")


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(local_model_path(cfg.model))
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise _cannot_load(cfg, e) from None


def load_model(cfg, device: torch.device, dtype: torch.dtype, attention: str):
    """The pretrained model for cfg.method; an unloadable model is a SpecError naming it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = dict(dtype=dtype, attn_implementation=attention)
    if cfg.method == "qlora":
        _probe_bitsandbytes(device, dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    if device.type == "cuda" or cfg.method == "qlora":
        kwargs["device_map"] = {"": device}  # straight onto the device, no full copy in host memory
    try:
        model = AutoModelForCausalLM.from_pretrained(local_model_path(cfg.model), **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise _cannot_load(cfg, e) from None
    model.config.use_cache = False
    # Past its context a model has no trained positions, and the attention mask alone would ask
    # for seq_len² bytes: refuse here, as the planner does, instead of crashing on the first step.
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and cfg.seq_len > context:
        raise SpecError(f"field 'seq_len': {cfg.seq_len} is longer than model '{cfg.model}' takes "
                        f"(max_position_embeddings {context})")
    return model


def apply_method(cfg, model, gradient_checkpointing: bool):
    """Full: everything trains. LoRA/QLoRA: peft adapters on cfg.lora.target_modules only."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "full":
        model.requires_grad_(True)
        return model, None
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, lora)
    except ValueError as e:
        detail = " ".join(str(e).split())[:300]
        raise SpecError(f"field 'lora.target_modules': {detail}") from None
    if gradient_checkpointing:
        # Frozen embeddings give checkpointed blocks inputs without grad; adapters need them.
        peft_model.enable_input_require_grads()
    return peft_model.get_base_model(), peft_model


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool: token i sees token j iff j <= i and both belong to the same document."""
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return (same_document & causal)[:, None]


def _chunk_loss_sum(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropy over labels != -100 (labels unshifted, as in HF)."""
    targets = labels[:, 1:].reshape(-1)
    states = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    keep = targets != IGNORE_INDEX
    states, targets = states[keep], targets[keep]
    # Starting from 0 * hidden keeps a graph even for a micro-batch without targets, so every
    # rank runs the same backward (DDP would hang otherwise).
    total = hidden.sum().float() * 0.0
    for start in range(0, targets.numel(), LOSS_CHUNK_TOKENS):
        end = start + LOSS_CHUNK_TOKENS
        total = total + checkpoint(_chunk_loss_sum, states[start:end], targets[start:end], head, use_reentrant=False)
    return total


class CausalLMLoss(nn.Module):
    """Wraps a *ForCausalLM so that forward returns the summed token loss of a packed micro-batch.

    DDP/FSDP wrap this module, so the whole forward (decoder + chunked head) goes through them.
    """

    def __init__(self, lm: nn.Module, attention: str):
        super().__init__()
        self.lm = lm
        self.attention = attention

    def forward(self, input_ids, labels, position_ids, document_ids) -> torch.Tensor:
        mask = None if self.attention == FLASH else block_causal_mask(document_ids)
        decoder = self.lm.get_decoder()
        hidden = decoder(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
        return chunked_cross_entropy_sum(hidden, self.lm.get_output_embeddings(), labels)


def wrap_distributed(module: CausalLMLoss, method: str, device: torch.device, world_size: int) -> nn.Module:
    """Single process: as is. torchrun: FSDP2 (sharded params, grads, optimizer) for full, DDP for adapters."""
    if world_size == 1:
        return module
    if method == "full":
        from torch.distributed.fsdp import fully_shard

        for layer in module.lm.get_decoder().layers:
            fully_shard(layer)
        return fully_shard(module)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def gradient_sync(wrapped: nn.Module, enabled: bool):
    """Context for one micro-batch: skip the gradient all-reduce on all but the last."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(wrapped, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def _activation_bytes_per_token(config, dtype: torch.dtype, checkpointed: bool) -> float:
    # Fitted to the H100 anchors (8B LoRA mb2 without checkpointing peaked at 58 GiB with 16 GiB
    # of weights): ~2 bytes x (16 hidden + 6 intermediate) per token per layer, kept for every
    # layer without checkpointing, for one layer plus each layer's input with it.
    width = 2 * (16 * config.hidden_size + 6 * config.intermediate_size) * (dtype.itemsize / 2)
    layers = config.num_hidden_layers
    if checkpointed:
        return width + layers * config.hidden_size * dtype.itemsize
    return width * layers


def plan_batch(cfg, model, device: torch.device, dtype: torch.dtype, per_rank_blocks: int, world_size: int) -> tuple[int, bool]:
    """(micro-batch in blocks, gradient checkpointing), honouring what the spec fixes: the fallback
    for a spec without an `execution:` section (a recipe run by hand). With one, the plan decided
    and this never runs (recipes/execution.py checks the plan against the device instead).

    On a GPU, 'auto' means: the largest micro-batch that fits without checkpointing if it
    still gives at least 4096 tokens per forward (checkpointing costs ~25-30% throughput per the
    anchors), else checkpointing with the largest micro-batch that fits.
    """
    micro, ckpt = cfg.batch.micro, cfg.train.gradient_checkpointing
    candidates = [m for m in (64, 32, 16, 8, 4, 2, 1) if m <= per_rank_blocks]
    if device.type != "cuda":
        return (min(8, per_rank_blocks) if micro == "auto" else micro), ckpt is True
    total = torch.cuda.get_device_properties(device).total_memory
    # Called before adapters exist: full trains every weight, adapters are negligible next to it.
    trainable = sum(p.numel() * p.element_size() for p in model.parameters()) if cfg.method == "full" else 0
    state = trainable * 3  # grads + two AdamW moments, in the weights' dtype
    shards = world_size if cfg.method == "full" else 1
    free = 0.85 * total - (torch.cuda.memory_allocated(device) + state) / shards - (2 << 30)

    def fits(m: int, checkpointed: bool) -> bool:
        return m * cfg.seq_len * _activation_bytes_per_token(model.config, dtype, checkpointed) <= free

    options = [(ckpt,)] if ckpt != "auto" else [(False,), (True,)]
    for (checkpointed,) in options:
        sizes = [micro] if micro != "auto" else candidates
        for m in sizes:
            big_enough = checkpointed or ckpt is False or m * cfg.seq_len >= 4096 or m == per_rank_blocks
            if fits(m, checkpointed) and big_enough:
                return m, checkpointed
    return (1 if micro == "auto" else micro), ckpt is not False
