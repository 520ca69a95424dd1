"""Supervised fine-tuning recipe: full, LoRA or QLoRA, with exact checkpoint-resume.

    python -m recipes.sft SPEC.yaml --run-dir DIR [--checkpoint-dir D|URL] [--attempt N] [--merge]
    torchrun --nproc-per-node 8 -m recipes.sft SPEC.yaml --run-dir DIR     (DDP; FSDP for full)

One explicit loop in the torchtune style: load model -> wrap for the method -> AdamW + LambdaLR
-> for each optimizer step take the next `batch.global` packed blocks from a seeded per-epoch
permutation, accumulate micro-batches, clip, step. Progress goes to `DIR/events.jsonl`
(DESIGN.md's contract) and a console bar. Exit codes: 0 finished, 75 preempted after a clean
checkpoint (SIGTERM/SIGINT), 2 bad input (one line on stderr), 1 crash.

A stop (SIGTERM/SIGINT: a spot notice, a cancel, the budget guard) is honoured before the next
micro-batch: the partial optimizer step is dropped and the last completed step is saved at once,
well inside the 30 s SkyPilot allows before SIGKILL. `--checkpoint-dir` may be an object-store URL
(s3://bucket/job/checkpoints): the recipe uploads checkpoints there itself, with a copy of
events.jsonl that a new node reads to continue the attempt numbering.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

from contract.errors import UserError
from contract.events import (DIVERGED, ERROR, EVENTS_FILE, EXIT_BAD_INPUT, EXIT_CRASH, EXIT_DISK_FULL, EXIT_DIVERGED,
                             EventLog, next_attempt)
from contract.faults import describe_disk_error, disk_error
from contract.spec import load_spec


class _OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (usage: python -m recipes.sft SPEC.yaml --run-dir DIR)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _directory(value: str) -> Path:
    """A directory, or where one can be made: events.jsonl is written there before anything else."""
    from contract.files import path_problem

    problem = path_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"not a usable path: {problem}")
    if os.path.exists(value) and not os.path.isdir(value):
        raise argparse.ArgumentTypeError("exists and is not a directory")
    return Path(value)


def parse_args(argv=None) -> argparse.Namespace:
    p = _OneLineArgumentParser(prog="python -m recipes.sft", description=__doc__.splitlines()[0])
    p.add_argument("spec", type=Path, help="job spec YAML (the same file `spotune plan` reads)")
    p.add_argument("--run-dir", type=_directory, required=True, help="events.jsonl and output/ go here")
    p.add_argument("--checkpoint-dir", default=None,
                   help="a directory (default RUN_DIR/checkpoints; e.g. a bucket mount) or an object-store URL "
                        "(s3://, gs://, az://) the recipe uploads to")
    p.add_argument("--attempt", type=int, default=os.environ.get("SPOTUNE_ATTEMPT"),
                   help="attempt number recorded in every event (default $SPOTUNE_ATTEMPT, else one more "
                        "than the attempts already in events.jsonl)")
    p.add_argument("--merge", action="store_true", help="LoRA/QLoRA: also write merged full weights to output/merged")
    return p.parse_args(argv)


def _quiet_libraries() -> None:
    # A bad-input exit must print exactly one line: silence the libraries' import-time chatter.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import warnings

    import transformers

    # PEFT reads `model.is_gradient_checkpointing`, which transformers releases deprecate in turn: the
    # warning would open every attempt's log while saying nothing the user can act on.
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop drops the step in progress, saves the last completed one
    and exits 75."""

    def __init__(self, poll=None):
        self.signal_name = None
        # Ray Train runs the recipe in a thread of its worker actor, where Python allows no signal
        # handlers: there the launcher's `poll` says whether a stop was asked for, and by what
        # (recipes/ray_train.py).
        self._poll = poll
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        if self.signal_name is None and self._poll is not None:
            self.signal_name = self._poll()
        return self.signal_name is not None


def _object_store(args, rank: int):
    """The object store named by --checkpoint-dir (None for a directory). On a fresh node its copy
    of events.jsonl comes first, so the attempt number continues where the last node stopped."""
    if args.checkpoint_dir is None:
        return None  # the run dir's own: no reason to load torch (recipes.checkpoint) before the spec is read
    from recipes.checkpoint import is_url

    if not is_url(args.checkpoint_dir):
        return None
    from recipes.object_store import ObjectCheckpoints

    store = ObjectCheckpoints(args.checkpoint_dir, cache_dir=args.run_dir / ".checkpoint-cache")
    if rank == 0:
        store.restore_events(args.run_dir / EVENTS_FILE)
    return store


def main(argv=None, *, on_checkpoint=None, stop_requested=None) -> int:
    """For a launcher that runs the recipe in a thread (Ray Train): `on_checkpoint(step, path)` is
    called on every rank after each checkpoint is complete (path on rank 0 only), and
    `stop_requested()` says, by a signal name, that the launcher was asked to stop (else None)."""
    args = parse_args(argv)
    args.started = time.monotonic()  # the loading phases' clock (recipes.trainer prints them)
    preemption = Preemption(stop_requested)  # before the slow setup, so an early SIGTERM is not lost
    rank = int(os.environ.get("RANK", "0"))
    try:
        store = _object_store(args, rank)
    except UserError as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.attempt is None:
        args.attempt = next_attempt(args.run_dir / EVENTS_FILE)
    events = EventLog(args.run_dir / EVENTS_FILE, attempt=args.attempt, enabled=rank == 0)
    inherited_group = _process_group_initialized()  # Ray Train's: Ray tears it down, not the recipe
    try:
        try:
            # The spec before torch and transformers load: a bad one is refused in a fraction of a second.
            spec = load_spec(args.spec, for_training=True)
            if rank == 0:  # importing torch and transformers takes seconds: say so, or the log looks hung
                print("[  0.0 s] loading torch and transformers", flush=True)  # stdout: stderr is for the error line
            _quiet_libraries()
            from recipes.trainer import Trainer

            return Trainer(spec, args, events, preemption, checkpoints=store, on_checkpoint=on_checkpoint).run()
        except UserError as e:
            # Bad input (spec, data, model, method vs device): the exception carries the one line.
            message = " ".join(str(e).split())
            if rank == 0:
                print(f"error: {message}", file=sys.stderr)
            events.emit(ERROR, message=message, kind="bad_input")
            return EXIT_BAD_INPUT
    except Exception as e:  # a crash: keep the traceback for the logs, one summary in events
        if (full := disk_error(e)) is not None:
            return _disk_full(full, args, events, rank)
        guards = sys.modules.get("recipes.guards")  # loaded with the trainer; nothing diverged before
        if guards is not None and isinstance(e, guards.Diverged):
            _end_progress_bars()
            if rank == 0:
                print(f"error: {e}", file=sys.stderr)
            events.emit(DIVERGED, **e.event())
            return EXIT_DIVERGED
        traceback.print_exc()
        events.emit(ERROR, message=f"{type(e).__name__}: {e}"[:2000], kind="crash")
        return EXIT_CRASH
    finally:
        try:
            events.close()
        except OSError:
            pass  # a full disk: the line that did not fit is already reported above
        if store is not None and rank == 0:
            store.publish_events(events.path)
        if _process_group_initialized() and not inherited_group:
            sys.modules["torch.distributed"].destroy_process_group()


def _process_group_initialized() -> bool:
    dist = sys.modules.get("torch.distributed")  # not imported only to learn it was never initialized
    return dist is not None and dist.is_available() and dist.is_initialized()


def _end_progress_bars() -> None:
    """A progress bar mid-line would swallow the start of the one error line: end it first."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", None) or ()):
        try:
            bar.close()
        except OSError:
            pass


def _disk_full(err: OSError, args, events: EventLog, rank: int) -> int:
    """A full or read-only disk: one line, no traceback, no retry (exit 74). The partial save and
    output are removed first, which also frees the room the error event needs."""
    from recipes.checkpoint import is_url, remove_partial_saves

    root = args.checkpoint_dir or args.run_dir / "checkpoints"
    if not is_url(root):
        remove_partial_saves(root)
    shutil.rmtree(args.run_dir / ".output-staging", ignore_errors=True)
    _end_progress_bars()
    message = describe_disk_error(err)
    if rank == 0:
        print(f"error: {message}", file=sys.stderr)
    try:
        events.emit(ERROR, message=message, kind="disk_full")
    except OSError:
        pass  # still no room: the supervisor reads the line above from the attempt's log
    return EXIT_DISK_FULL


if __name__ == "__main__":
    sys.exit(main())
