"""The trainer's checkpoint glue: what a checkpoint holds, and saving and restoring it across ranks.

recipes/checkpoint.py is the store (directories, manifests, uploads) and recipes/resumable.py checks
that a checkpoint loads as what a resume reads; this is the part between them and the loop: gather
the full model and optimizer state and every rank's RNG state, hand them to the store on rank 0,
report the save, and on a resume find the newest usable checkpoint and put it back on every rank.
"""
from __future__ import annotations

import sys

import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict)

from recipes import checkpoint as ckpt
from recipes.resumable import CheckpointUnusable, load_for_resume


class TrainerCheckpoints:
    """Mixed into recipes.trainer.Trainer, whose state it saves and restores. It reads what the
    Trainer sets up: cfg, events, checkpoints, budget, on_checkpoint, rank, world_size, model,
    optimizer, scheduler, order and the data position (step, epoch, index, tokens, last_loss), and
    calls its _check_finite_weights; it keeps _saved_step, the step of the newest checkpoint this
    process wrote or resumed from."""

    def _fingerprint(self) -> dict:
        # What must not change between attempts for the saved data position to mean the same.
        return {"model": self.cfg.model, "method": self.cfg.method, "seq_len": self.cfg.seq_len,
                "global_batch": self.cfg.batch.global_, "seed": self.cfg.train.seed, "blocks": self.order.n_blocks}

    # --- checkpoints -------------------------------------------------------------------------
    def _state_options(self, **extra) -> StateDictOptions:
        # Full (unsharded) tensors gathered to CPU; LoRA/QLoRA checkpoints hold the adapters only.
        return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **extra)

    def _save(self) -> None:
        self._check_finite_weights()  # a checkpoint of NaN weights would be resumed from
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
            saved = self.checkpoints.save(self.step, {
                "model.pt": model_state, "optimizer.pt": optimizer_state, "trainer_state.pt": trainer_state,
            }, keep=self.cfg.checkpoint.keep)
            self.events.emit("checkpoint", step=self.step, path=str(saved.path), seconds=round(saved.seconds, 3),
                             bytes=saved.bytes)
            if self.budget is not None:
                self.budget.saw_save(saved.seconds)
                self.budget.record()
            self.checkpoints.publish_events(self.events.path)
        self._saved_step = self.step
        if self.world_size > 1:
            dist.barrier()
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.step, saved.path if self.rank == 0 else None)

    def _find_resumable(self):
        """Rank 0: the newest checkpoint that verifies against what a resume needs and loads, as
        (path, trainer state, model state, optimizer state). Every newer one that does not is
        reported (`checkpoint_skipped`, which the ledger counts as lost work) and set aside."""
        skipped = []
        while True:
            path, unverified = self.checkpoints.find_resumable(ckpt.REQUIRED_FILES)
            skipped += [(bad, self.checkpoints.reject(bad)) for bad in unverified]
            loaded = None
            if path is not None:
                try:
                    loaded = load_for_resume(path, self._fingerprint())
                except CheckpointUnusable as e:
                    bad = ckpt.SkippedCheckpoint(path=path, step=ckpt.checkpoint_step(path), reason=str(e))
                    self.checkpoints.release(path)
                    again = any(earlier.step == bad.step for earlier, _ in skipped)
                    skipped.append((bad, self.checkpoints.reject(bad)))
                    if not again:  # set aside, so the next look finds an older one (never the same twice)
                        continue
                    path = None
            for bad, moved in skipped:
                self.events.emit("checkpoint_skipped", step=bad.step, path=str(bad.path), reason=bad.reason,
                                 moved_to=moved)
                print(f"checkpoint at step {bad.step} is not usable ({bad.reason})", file=sys.stderr)
            if skipped:
                print(f"resuming from the checkpoint at step {loaded[0]['step']}" if loaded is not None else
                      f"no usable checkpoint is left (all {len(skipped)} skipped): training starts from step 0",
                      file=sys.stderr)
            return path, loaded

    def _resume(self) -> None:
        path, loaded = self._find_resumable() if self.rank == 0 else (None, None)
        state = loaded[0] if loaded is not None else None
        if self.world_size > 1:
            box = [state]
            dist.broadcast_object_list(box, src=0)
            state = box[0]
        if state is None:
            return
        options = self._state_options(broadcast_from_rank0=self.world_size > 1)
        model_state, optimizer_state = loaded[1:] if self.rank == 0 else ({}, {})
        if self.rank == 0:
            self.checkpoints.release(path)
        # An adapter checkpoint holds the trainable weights only. Under torchrun a strict load would
        # have rank 0 demand the frozen base weights too (torch's "Missing key: ...embed_tokens"),
        # which every rank has already loaded itself.
        adapters_only = self.cfg.method != "full" and self.world_size > 1
        set_model_state_dict(self.model, model_state, options=self._state_options(
            broadcast_from_rank0=self.world_size > 1, strict=not adapters_only))
        set_optimizer_state_dict(self.model, self.optimizer, optimizer_state, options=options)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch, self.index, self.tokens = state["step"], state["epoch"], state["index"], state["tokens"]
        self.last_loss = state["last_loss"]
        self._saved_step = self.step
        if self.rank < len(state["rng"]):  # a resume on fewer/more GPUs keeps what overlaps
            ckpt.restore_rng_state(state["rng"][self.rank])
