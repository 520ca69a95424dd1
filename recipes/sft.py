"""Supervised fine-tuning recipe: full, LoRA or QLoRA, with exact checkpoint-resume.

    python -m recipes.sft SPEC.yaml --run-dir DIR [--checkpoint-dir D] [--attempt N] [--merge]
    torchrun --nproc-per-node 8 -m recipes.sft SPEC.yaml --run-dir DIR     (DDP; FSDP for full)

One explicit loop in the torchtune style: load model -> wrap for the method -> AdamW + LambdaLR
-> for each optimizer step take the next `batch.global` packed blocks from a seeded per-epoch
permutation, accumulate micro-batches, clip, step. Progress goes to `DIR/events.jsonl`
(DESIGN.md's contract) and a console bar. Exit codes: 0 finished, 75 preempted after a clean
checkpoint (SIGTERM/SIGINT), 2 bad input (one line on stderr), 1 crash.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import traceback
from pathlib import Path

from contract.errors import UserError
from contract.events import ERROR, EVENTS_FILE, EXIT_BAD_INPUT, EXIT_CRASH, EventLog, next_attempt
from contract.spec import load_spec


class _OneLineArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"error: {message} (usage: python -m recipes.sft SPEC.yaml --run-dir DIR)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def parse_args(argv=None) -> argparse.Namespace:
    p = _OneLineArgumentParser(prog="python -m recipes.sft", description=__doc__.splitlines()[0])
    p.add_argument("spec", type=Path, help="job spec YAML (the same file `spotune plan` reads)")
    p.add_argument("--run-dir", type=Path, required=True, help="events.jsonl and output/ go here")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="default RUN_DIR/checkpoints (e.g. a bucket mount)")
    p.add_argument("--attempt", type=int, default=os.environ.get("SPOTUNE_ATTEMPT"),
                   help="attempt number recorded in every event (default $SPOTUNE_ATTEMPT, else one more "
                        "than the attempts already in events.jsonl)")
    p.add_argument("--merge", action="store_true", help="LoRA/QLoRA: also write merged full weights to output/merged")
    return p.parse_args(argv)


def _quiet_libraries() -> None:
    # A bad-input exit must print exactly one line: silence the libraries' import-time chatter.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits 75."""

    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame):
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


def main(argv=None) -> int:
    args = parse_args(argv)
    preemption = Preemption()  # before the slow setup, so an early SIGTERM is not lost
    rank = int(os.environ.get("RANK", "0"))
    if args.attempt is None:
        args.attempt = next_attempt(args.run_dir / EVENTS_FILE)
    events = EventLog(args.run_dir / EVENTS_FILE, attempt=args.attempt, enabled=rank == 0)
    try:
        _quiet_libraries()
        from recipes.trainer import Trainer

        try:
            spec = load_spec(args.spec, for_training=True)
            return Trainer(spec, args, events, preemption).run()
        except UserError as e:
            # Bad input (spec, data, model, method vs device): the exception carries the one line.
            message = " ".join(str(e).split())
            if rank == 0:
                print(f"error: {message}", file=sys.stderr)
            events.emit(ERROR, message=message, kind="bad_input")
            return EXIT_BAD_INPUT
    except Exception as e:  # a crash: keep the traceback for the logs, one summary in events
        traceback.print_exc()
        events.emit(ERROR, message=f"{type(e).__name__}: {e}"[:2000], kind="crash")
        return EXIT_CRASH
    finally:
        events.close()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
