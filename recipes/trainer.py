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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from contract.dataset import block_order
from contract.events import DEVIATION, EXIT_FINISHED, EXIT_OVER_BUDGET, EXIT_PREEMPTED, OVER_BUDGET
from contract.spec import SpecError
from recipes import checkpoint as ckpt
from recipes.data import IGNORE_INDEX, build_datasets
from recipes.modeling import (
    CausalLMLoss, apply_method, attention_implementation, compute_dtype, device_facts, dtype_name, gradient_sync,
    load_model, load_tokenizer, plan_batch, torch_dtype, wrap_distributed)
from recipes.execution import follow_plan, recipe_decision
from recipes.guards import Diverged, NodeBudget, all_finite
from recipes.stopping import StepInterrupted, StopVote, drop_partial_step
from recipes.trainer_checkpoints import TrainerCheckpoints

BLOCK_FIELDS = ("input_ids", "labels", "position_ids", "document_ids")


class DataOrder:
    """Per-epoch seeded permutations of the packed blocks, read as one endless stream."""

    def __init__(self, n_blocks: int, seed: int):
        self.n_blocks, self.seed = n_blocks, seed
        self._cached = (None, None)

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._cached[0] != epoch:
            # The contract's order, not torch's RNG: the planner counts a partial last epoch with it.
            self._cached = (epoch, torch.tensor(block_order(self.n_blocks, self.seed, epoch), dtype=torch.long))
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


class Trainer(TrainerCheckpoints):
    """The loop and what it needs; saving and resuming a checkpoint is TrainerCheckpoints'
    (recipes/trainer_checkpoints.py)."""

    def __init__(self, cfg, args, events, preemption, checkpoints=None, on_checkpoint=None):
        self.cfg, self.events, self.preemption = cfg, events, preemption
        self.on_checkpoint = on_checkpoint  # (step, path on rank 0 else None), after every rank saved
        self.run_dir = Path(args.run_dir)
        # A directory (or bucket mount), or an object-store URL the recipe uploads to itself.
        self.checkpoints = checkpoints or ckpt.open_checkpoints(
            args.checkpoint_dir or self.run_dir / "checkpoints", cache_dir=self.run_dir / ".checkpoint-cache")
        self._saved_step = None  # the step of the newest checkpoint this process wrote or resumed from
        # The node's budget guard: only with a budget and the plan's price in the environment.
        self.budget = NodeBudget.for_run(cfg, self.checkpoints.location, args.attempt or 1)
        self.merge = args.merge
        self.started = getattr(args, "started", time.monotonic())  # when the recipe process began
        self._setup_distributed()
        # One decision per run: the plan's execution config, checked against this device (any
        # change is a logged deviation), or for a spec without one the recipe's fallback below.
        self.facts = device_facts(self.device, self.world_size)
        self.execution, self.deviations = None, []
        if cfg.execution is not None:
            self.execution, self.deviations = follow_plan(cfg.execution, cfg.method, cfg.batch.global_, self.facts)
            self.dtype, self.attention = torch_dtype(self.execution.dtype), self.execution.attention
        else:
            self.dtype = compute_dtype(self.device)
            self.attention = attention_implementation(self.device, self.dtype)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        if cfg.batch.global_ % self.world_size:
            raise SpecError(f"field 'batch.global': {cfg.batch.global_} blocks do not split evenly over "
                              f"{self.world_size} GPUs")
        self.per_rank_blocks = cfg.batch.global_ // self.world_size

        # Data before the model: a bad line fails in seconds, not after loading 16 GB of weights.
        self._phase(f"loading the tokenizer of {cfg.model}")
        self.tokenizer = load_tokenizer(cfg)
        self._phase("reading and tokenizing the data")
        train_blocks, _, self.data_stats = build_datasets(cfg, self.tokenizer)
        self._phase(f"data: {self.data_stats.train_examples:,} examples in {len(train_blocks):,} packed blocks")
        _seed_everything(cfg.train.seed)  # LoRA init draws from it: identical on every rank
        self._phase(f"loading the model {cfg.model} ({cfg.method}, {self.device.type}, {dtype_name(self.dtype)})")
        model = load_model(cfg, self.device, self.dtype, self.attention)
        self.blocks = {k: torch.tensor([b[k] for b in train_blocks], dtype=torch.int32) for k in BLOCK_FIELDS}
        self.block_tokens = (self.blocks["document_ids"] >= 0).sum(dim=1)
        if self.execution is None:
            micro, checkpointing = plan_batch(cfg, model, self.device, self.dtype, self.per_rank_blocks, self.world_size)
            self.execution = recipe_decision(self.facts, cfg.method, cfg.batch.global_, micro, checkpointing,
                                             self.attention, dtype_name(self.dtype))
        self.micro, self.gradient_checkpointing = self.execution.micro_batch, self.execution.gradient_checkpointing
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
    def _phase(self, what: str) -> None:
        """A loading phase in the attempt's log, as it starts: start-up can take a minute before
        the first step, and a log that says nothing meanwhile looks hung (`spotune logs -f`). On
        stdout, which the log holds too: stderr stays the one `error:` line of a bad input."""
        if self.rank == 0:
            print(f"[{time.monotonic() - self.started:5.1f} s] {what}", flush=True)

    def _setup_distributed(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        # Ray Train starts the process group itself before the recipe runs: use it, as torchrun's
        # workers would have used theirs.
        if self.world_size > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self._stop_vote = StopVote(self.preemption, self.world_size)

    # --- the loop ----------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step. A stop request seen before any micro-batch drops the partial step and
        raises StepInterrupted, leaving the trainer exactly at the last completed step."""
        indices, epoch, index = self.order.take(self.epoch, self.index, self.cfg.batch.global_)
        # Every rank knows the whole step's blocks, so the loss normalizer needs no communication:
        # the mean over all target tokens of the global batch, however it is split.
        targets = int((self.blocks["labels"][indices][:, 1:] != IGNORE_INDEX).sum().clamp(min=1))
        step_tokens = int(self.block_tokens[indices].sum())
        mine = indices[self.rank * self.per_rank_blocks:(self.rank + 1) * self.per_rank_blocks]
        chunks = [mine[i:i + self.micro] for i in range(0, len(mine), self.micro)]
        lr = self.scheduler.get_last_lr()[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        rng_at_step_start = ckpt.capture_rng_state()
        for i, chunk in enumerate(chunks):
            if self._stop_vote():  # a stop waits for one micro-batch, never for the rest of the step
                drop_partial_step(self.optimizer, rng_at_step_start)
                raise StepInterrupted(i)
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
        # The data position moves with a completed step only: an interrupted one is taken again.
        self.epoch, self.index = epoch, index
        return float(loss_sum) / targets, lr, step_tokens

    def _agree(self, *flags: bool) -> list[bool]:
        """Every rank acts on the same decision (any rank's signal or clock counts)."""
        if self.world_size == 1:
            return list(flags)
        votes = torch.tensor([int(f) for f in flags], device=self.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return [bool(v) for v in votes.tolist()]

    def _stop_now(self, dropped_micro_batches: int) -> int:
        """SIGTERM inside a step: save the last completed step at once (unless that checkpoint
        exists already, or there is no step to save) and exit 75. Every rank gets here together."""
        if self.step > 0 and self._saved_step != self.step:
            self._save()
        self.events.emit("preempted", step=self.step, signal=self.preemption.signal_name or "peer",
                         dropped_micro_batches=dropped_micro_batches)
        return EXIT_PREEMPTED

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
        for deviation in self.deviations:
            self.events.emit(DEVIATION, **deviation.payload())
            if self.rank == 0:
                print(f"deviation from the plan ({deviation.kind}): {deviation.reason}", file=sys.stderr)
        ran = self.execution.ran()
        self.events.emit(
            "start", resumed_from_step=resumed_from, device=self.device.type,
            gpu_name=torch.cuda.get_device_name(self.device) if cuda else None,
            gpu_count=self.world_size if cuda else 0, total_steps=self.total_steps, total_tokens=self._planned_tokens(),
            method=self.cfg.method, global_batch=self.cfg.batch.global_,
            **{k: ran[k] for k in ("micro_batch", "grad_accum", "gradient_checkpointing", "attention", "dtype", "sharding")},
            decided_by="plan" if self.cfg.execution is not None else "recipe", blocks=self.order.n_blocks, epoch=self.epoch,
            examples=self.data_stats.train_examples, skipped_lines=sum(self.data_stats.skipped.values()))
        if self.rank == 0:  # a new node reads the attempt numbering from the copy with the checkpoints
            self.checkpoints.publish_events(self.events.path)
        if self.budget is not None:
            self.budget.saw_start(time.time())
            if self.rank == 0:
                self.budget.record()
            if self._agree(self.budget.over() is not None)[0]:  # spent before it started: nothing to train
                return self._stop_for_budget()
        if self.preemption.requested:  # signalled during setup: the last checkpoint already holds it all
            self.events.emit("preempted", step=self.step, signal=self.preemption.signal_name)
            return EXIT_PREEMPTED
        from tqdm import tqdm

        self._phase(f"training: step {self.step + 1} of {self.total_steps} (the first step is the slowest)")
        bar = self._bar = tqdm(total=self.total_steps, initial=self.step, disable=self.rank != 0, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 30, unit="step", dynamic_ncols=True)
        every_steps, every_minutes = self.cfg.checkpoint.every_steps, self.cfg.checkpoint.every_minutes
        started = last_save = window_start = time.monotonic()
        window_tokens = 0
        while self.step < self.total_steps:
            try:
                loss, lr, step_tokens = self.train_step()
            except StepInterrupted as interrupted:
                bar.close()
                return self._stop_now(interrupted.dropped_micro_batches)
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
            if not math.isfinite(loss):
                bar.close()
                raise Diverged(self.step, loss, self._saved_step)
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
            if self.budget is not None:
                self.budget.saw_step(self.step, time.time())
                if self._agree(self.budget.over() is not None and self.step < self.total_steps)[0]:
                    bar.close()
                    return self._stop_for_budget()
        bar.close()
        output = self._write_output()
        # A launcher that publishes the output to durable storage (SkyPilot's run script: the
        # checkpoint store's URL) says where; the event records where the output will be kept.
        self.events.emit("finished", step=self.step, tokens=self.tokens, final_loss=self.last_loss,
                         train_seconds=round(time.monotonic() - started, 3),
                         output_path=os.environ.get("SPOTUNE_OUTPUT_URL") or str(output))
        return EXIT_FINISHED

    def _stop_for_budget(self) -> int:
        """Spent + the next checkpoint interval would pass the budget: save this step (unless it is
        saved already) and exit 80, which no launcher retries."""
        why = self.budget.over() or "over budget"
        if self.step > 0 and self._saved_step != self.step:
            self._save()
        message = f"{why}; stopped with a checkpoint at step {self.step}" if self.step else f"{why}; nothing trained"
        if self.rank == 0:
            self.budget.record()
            print(message, file=sys.stderr)
        self.events.emit(OVER_BUDGET, **self.budget.event(self.step, message))
        return EXIT_OVER_BUDGET

    def _check_finite_weights(self) -> None:
        if self._agree(not all_finite(self.params))[0]:
            if getattr(self, "_bar", None) is not None:
                self._bar.close()  # the one error line starts a line of its own, not the bar's
            raise Diverged(self.step, self.last_loss, self._saved_step)

    # --- output ------------------------------------------------------------------------------
    def _write_output(self) -> Path:
        """Adapter (LoRA/QLoRA) or full weights + tokenizer, renamed into place when complete."""
        self._check_finite_weights()
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
