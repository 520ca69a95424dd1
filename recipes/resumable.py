"""A checkpoint is resumable when a resume can use it, not only when its manifest verifies.

The manifest check (recipes/checkpoint.py) proves the files are the ones that were written and that
the three a resume needs are listed. This loads them and checks each holds what a resume reads: a
trainer_state.pt of garbage under a re-hashed manifest, or a model.pt with no weights, is as useless
as a torn upload, and the trainer falls back to an older checkpoint instead of crashing on it.
"""
from __future__ import annotations

from typing import Optional

import torch

from contract.spec import SpecError
from recipes import checkpoint as ckpt


class CheckpointUnusable(Exception):
    """A checkpoint whose manifest verifies but whose files a resume cannot use."""


# What a resume reads from trainer_state.pt, and the types it must have.
_TRAINER_STATE = {"step": int, "epoch": int, "index": int, "tokens": int, "scheduler": dict, "rng": list,
                  "fingerprint": dict}


def _problem(state, model_state, optimizer_state) -> Optional[str]:
    if not isinstance(state, dict):
        return "trainer_state.pt is not a trainer state"
    wrong = [k for k, kind in _TRAINER_STATE.items() if not isinstance(state.get(k), kind)]
    if wrong or "last_loss" not in state:
        return f"trainer_state.pt lacks {', '.join(wrong or ['last_loss'])}"
    if not (isinstance(model_state, dict) and model_state and all(isinstance(v, torch.Tensor) for v in model_state.values())):
        return "model.pt holds no weights"
    if not (isinstance(optimizer_state, dict) and {"state", "param_groups"} <= optimizer_state.keys()):
        return "optimizer.pt holds no optimizer state"
    return None


def load_for_resume(path, fingerprint: dict) -> tuple[dict, dict, dict]:
    """(trainer state, model state, optimizer state) of the checkpoint at `path`. CheckpointUnusable
    says what a resume cannot use; a checkpoint of another job (other model, data, batch or seed)
    is the user's mistake, a one-line SpecError, never a silent fallback."""
    loaded = {}
    for name in ("trainer_state.pt", "model.pt", "optimizer.pt"):
        try:
            loaded[name] = ckpt.load_checkpoint_file(path, name)
        except Exception as e:  # unpickling garbage raises anything from EOFError to RuntimeError
            raise CheckpointUnusable(f"{name} cannot be loaded: {type(e).__name__}") from None
    state, model_state, optimizer_state = loaded.values()
    problem = _problem(state, model_state, optimizer_state)
    if problem is not None:
        raise CheckpointUnusable(problem)
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k, v in fingerprint.items() if state["fingerprint"].get(k) != v)
        raise SpecError(f"checkpoint {path} was made for a different job ({', '.join(changed)} changed); "
                        "use a new --run-dir or --checkpoint-dir")
    return state, model_state, optimizer_state
