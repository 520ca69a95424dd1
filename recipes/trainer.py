"""The training loop: setup, exact resume, optimizer steps, checkpoints, preemption, output.

Exactness rests on three things being restored, not recomputed: the data position (epoch +
index into that epoch's seeded permutation of packed blocks, read as one stream so a step may
cross an epoch boundary), the optimizer/scheduler state, and every RNG state. Everything else is
a pure function of the spec, so a run stopped at step k and resumed logs the same losses as an
uninterrupted one.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

from contract.events import EXIT_FINISHED, EXIT_PREEMPTED
from contract.spec import SpecError
from recipes import checkpoint as ckpt
from recipes.data import IGNORE_INDEX, build_datasets
from recipes.modeling import (
    CausalLMLoss, apply_method, attention_implementation, compute_dtype, gradient_sync, load_model, load_tokenizer,
    plan_batch, wrap_distributed)

BLOCK_FIELDS = ("input_ids", "labels", "position_ids", "document_ids")


class DataOrder:
    """Per-epoch seeded permutations of the packed blocks, read as one endless stream."""

    def __init__(self, n_blocks: int, seed: int):
        self.n_blocks, self.seed = n_blocks, seed
        self._cached = (None, None)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cached[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cached = (epoch, torch.randperm(self.n_blocks, generator=generator))
        return self._cached[1]

    def take(self, epoch: int, index: int, count: int) -> tuple[list[int], int, int]:
        """The next `count` block indices from (epoch, index), and the position after them."""
        taken: list[int] = []
        while len(taken) < count:
            grab = min(count - len(taken), self.n_blocks - index)
            taken += self.permutation(epoch)[index:index + grab].tolist()
            index += grab
            if index == self.n_blocks:
                epoch, index = epoch + 1, 0
        return taken, epoch, index


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg, args, events, preemption):
        self.cfg, self.events, self.preemption = cfg, events, preemption
        self.run_dir = Path(args.run_dir)
        self.checkpoint_root = Path(args.checkpoint_dir) if args.checkpoint_dir else self.run_dir / "checkpoints"
        self.merge = args.merge
        self._setup_distributed()
        self.dtype = compute_dtype(self.device)
        self.attention = attention_implementation(self.device, self.dtype)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        if cfg.batch.global_ % self.world_size:
            raise SpecError(f"field 'batch.global': {cfg.batch.global_} blocks do not split evenly over "
                              f"{self.world_size} GPUs")
        self.per_rank_blocks = cfg.batch.global_ // self.world_size

        # Data before the model: a bad line fails in seconds, not after loading 16 GB of weights.
        self.tokenizer = load_tokenizer(cfg)
        train_blocks, _, self.data_stats = build_datasets(cfg, self.tokenizer)
        _seed_everything(cfg.train.seed)  # LoRA init draws from it: identical on every rank
        model = load_model(cfg, self.device, self.dtype, self.attention)
        self.blocks = {k: torch.tensor([b[k] for b in train_blocks], dtype=torch.int32) for k in BLOCK_FIELDS}
        self.block_tokens = (self.blocks["document_ids"] >= 0).sum(dim=1)
        self.micro, self.gradient_checkpointing = plan_batch(
            cfg, model, self.device, self.dtype, self.per_rank_blocks, self.world_size)
        self.lm, self.peft_model = apply_method(cfg, model, self.gradient_checkpointing)
        self.model = wrap_distributed(CausalLMLoss(self.lm, self.attention), cfg.method, self.device, self.world_size)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay,
                                           fused=self.device.type == "cuda")

        n_blocks = len(train_blocks)
        self.order = DataOrder(n_blocks, cfg.train.seed)
        self.total_steps = cfg.train.max_steps or math.ceil(cfg.epochs * n_blocks / cfg.batch.global_)
        warmup = math.ceil(cfg.train.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, cfg.train.scheduler))
        self.step, self.epoch, self.index, self.tokens = 0, 0, 0, 0
        self.last_loss = None
        # Dropout streams differ per rank; a checkpoint restores each rank's own state.
        _seed_everything(cfg.train.seed + self.rank)

    # --- setup -------------------------------------------------------------------------------
    def _setup_distributed(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def _fingerprint(self) -> dict:
        # What must not change between attempts for the saved data position to mean the same.
        return {"model": self.cfg.model, "method": self.cfg.method, "seq_len": self.cfg.seq_len,
                "global_batch": self.cfg.batch.global_, "seed": self.cfg.train.seed, "blocks": self.order.n_blocks}

    # --- checkpoints -------------------------------------------------------------------------
    def _state_options(self, **extra) -> StateDictOptions:
        # Full (unsharded) tensors gathered to CPU; LoRA/QLoRA checkpoints hold the adapters only.
        return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **extra)

    def _save(self) -> None:
        model_state = get_model_state_dict(self.model, options=self._state_options())
        optimizer_state = get_optimizer_state_dict(self.model, self.optimizer, options=self._state_options())
        rng = [ckpt.capture_rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, ckpt.capture_rng_state())
        if self.rank == 0:
            trainer_state = {"step": self.step, "epoch": self.epoch, "index": self.index, "tokens": self.tokens,
                             "last_loss": self.last_loss, "scheduler": self.scheduler.state_dict(), "rng": rng,
                             "fingerprint": self._fingerprint()}
            saved = ckpt.save_checkpoint(self.checkpoint_root, self.step, {
                "model.pt": model_state, "optimizer.pt": optimizer_state, "trainer_state.pt": trainer_state,
            }, keep=self.cfg.checkpoint.keep)
            self.events.emit("checkpoint", step=self.step, path=str(saved.path), seconds=round(saved.seconds, 3),
                             bytes=saved.bytes)
        if self.world_size > 1:
            dist.barrier()

    def _find_resumable(self):
        """Rank 0 looks; a newer checkpoint that fails verification is reported and set aside."""
        ckpt.remove_partial_saves(self.checkpoint_root)
        path, skipped = ckpt.find_resumable(self.checkpoint_root)
        for bad in skipped:
            moved = ckpt.reject(bad.path)
            self.events.emit("checkpoint_skipped", step=bad.step, path=str(bad.path), reason=bad.reason,
                             moved_to=str(moved))
            print(f"checkpoint at step {bad.step} failed verification ({bad.reason}); using an older one",
                  file=sys.stderr)
        return path

    def _resume(self) -> None:
        path = self._find_resumable() if self.rank == 0 else None
        state = None
        if path is not None:
            state = ckpt.load_checkpoint_file(path, "trainer_state.pt")
            if state["fingerprint"] != self._fingerprint():
                changed = sorted(k for k, v in self._fingerprint().items() if state["fingerprint"].get(k) != v)
                raise SpecError(f"checkpoint {path} was made for a different job ({', '.join(changed)} changed); "
                                  "use a new --run-dir or --checkpoint-dir")
        if self.world_size > 1:
            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        if state is None:
            return
        options = self._state_options(broadcast_from_rank0=self.world_size > 1)
        model_state = ckpt.load_checkpoint_file(path, "model.pt") if self.rank == 0 else {}
        optimizer_state = ckpt.load_checkpoint_file(path, "optimizer.pt") if self.rank == 0 else {}
        set_model_state_dict(self.model, model_state, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.index, self.tokens = state["step"], state["epoch"], state["index"], state["tokens"]
        self.last_loss = state["last_loss"]
        if self.rank < len(state["rng"]):  # a resume on fewer/more GPUs keeps what overlaps
            ckpt.restore_rng_state(state["rng"][self.rank])

    # --- the loop ----------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, int]:
        indices, self.epoch, self.index = self.order.take(self.epoch, self.index, self.cfg.batch.global_)
        # Every rank knows the whole step's blocks, so the loss normalizer needs no communication:
        # the mean over all target tokens of the global batch, however it is split.
        targets = int((self.blocks["labels"][indices][:, 1:] != IGNORE_INDEX).sum().clamp(min=1))
        step_tokens = int(self.block_tokens[indices].sum())
        mine = indices[self.rank * self.per_rank_blocks:(self.rank + 1) * self.per_rank_blocks]
        chunks = [mine[i:i + self.micro] for i in range(0, len(mine), self.micro)]
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, chunk in enumerate(chunks):
            batch = {k: self.blocks[k][chunk].to(self.device, dtype=torch.long) for k in BLOCK_FIELDS}
            with gradient_sync(self.model, enabled=i == len(chunks) - 1):
                micro_loss = self.model(**batch)
                # DDP/FSDP average gradients over ranks; scaling by world size makes that a sum.
                (micro_loss * (self.world_size / targets)).backward()
            loss_sum += micro_loss.detach()
        if self.world_size > 1:
            dist.all_reduce(loss_sum)
        if self.cfg.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss_sum) / targets, lr, step_tokens

    def _agree(self, *flags: bool) -> list[bool]:
        """Every rank acts on the same decision (any rank's signal or clock counts)."""
        if self.world_size == 1:
            return list(flags)
        votes = torch.tensor([int(f) for f in flags], device=self.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return [bool(v) for v in votes.tolist()]

    def _planned_tokens(self) -> int:
        full_epochs, remainder = divmod(self.total_steps * self.cfg.batch.global_, self.order.n_blocks)
        last = self.order.permutation(full_epochs)[:remainder]
        return int(self.block_tokens.sum()) * full_epochs + int(self.block_tokens[last].sum())

    def run(self) -> int:
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._resume()
        resumed_from = self.step if self.step > 0 else None
        cuda = self.device.type == "cuda"
        self.events.emit(
            "start", resumed_from_step=resumed_from, device=self.device.type,
            gpu_name=torch.cuda.get_device_name(self.device) if cuda else None,
            gpu_count=self.world_size if cuda else 0, total_steps=self.total_steps, total_tokens=self._planned_tokens(),
            method=self.cfg.method, micro_batch=self.micro, global_batch=self.cfg.batch.global_,
            gradient_checkpointing=self.gradient_checkpointing, attention=self.attention,
            dtype=str(self.dtype).removeprefix("torch."), blocks=self.order.n_blocks, epoch=self.epoch,
            examples=self.data_stats.train_examples, skipped_lines=sum(self.data_stats.skipped.values()))
        if self.preemption.requested:  # signalled during setup: the last checkpoint already holds it all
            self.events.emit("preempted", step=self.step, signal=self.preemption.signal_name)
            return EXIT_PREEMPTED
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 30, unit="step", dynamic_ncols=True)
        every_steps, every_minutes = self.cfg.checkpoint.every_steps, self.cfg.checkpoint.every_minutes
        started = last_save = window_start = time.monotonic()
        window_tokens = 0
        while self.step < self.total_steps:
            loss, lr, step_tokens = self.train_step()
            self.step += 1
            self.tokens += step_tokens
            self.last_loss = loss
            window_tokens += step_tokens
            now = time.monotonic()
            tokens_per_second = window_tokens / max(now - window_start, 1e-9)
            if self.step % self.cfg.train.log_every_steps == 0 or self.step == self.total_steps:
                self.events.emit("step", step=self.step, tokens=self.tokens, loss=loss, lr=lr,
                                 tokens_per_second=round(tokens_per_second, 2))
                window_start, window_tokens = now, 0
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_second:,.0f}", refresh=False)
            due = bool(every_steps and self.step % every_steps == 0) or bool(
                every_minutes and now - last_save >= every_minutes * 60)
            stop, due = self._agree(self.preemption.requested, due and self.step < self.total_steps)
            if stop or due:
                self._save()
                last_save = time.monotonic()
            if stop:
                bar.close()
                self.events.emit("preempted", step=self.step, signal=self.preemption.signal_name or "peer")
                return EXIT_PREEMPTED
        bar.close()
        output = self._write_output()
        self.events.emit("finished", step=self.step, tokens=self.tokens, final_loss=self.last_loss,
                         train_seconds=round(time.monotonic() - started, 3), output_path=str(output))
        return EXIT_FINISHED

    # --- output ------------------------------------------------------------------------------
    def _write_output(self) -> Path:
        """Adapter (LoRA/QLoRA) or full weights + tokenizer, renamed into place when complete."""
        output = self.run_dir / "output"
        full_state = None
        if self.cfg.method == "full":
            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            full_state = {k.removeprefix("lm."): v for k, v in state.items()}
        if self.rank == 0:
            staging = self.run_dir / ".output-staging"
            shutil.rmtree(staging, ignore_errors=True)
            if self.peft_model is not None:
                self.peft_model.save_pretrained(staging)
            else:
                self.lm.save_pretrained(staging, state_dict=full_state)
            self.tokenizer.save_pretrained(staging)
            if self.merge and self.peft_model is not None:
                self._merge(staging)
            if output.exists():
                shutil.rmtree(output)
            os.rename(staging, output)
        if self.world_size > 1:
            dist.barrier()
        return output

    def _merge(self, adapter_dir: Path) -> None:
        """Base weights in the compute dtype + adapter, merged, as a plain model in output/merged."""
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from recipes.tiny import local_model_path

        base = AutoModelForCausalLM.from_pretrained(local_model_path(self.cfg.model), dtype=self.dtype)
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(adapter_dir / "merged")
        self.tokenizer.save_pretrained(adapter_dir / "merged")
