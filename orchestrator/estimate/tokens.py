"""How many tokens a job trains on, counted the way the recipe will train them.

The dataset is read by `contract.dataset`, the recipe's own parsing: the same format detection,
chat template, completion masks, length rule and bad-line handling, so a dataset the recipe
would reject fails here, at plan time, with the same `file:line` message. With the model's
tokenizer (`orchestrator.architectures.model_tokenizer`: tiny-llama's, a local model's, or the
Hub's), the count is exact: the validation split, packing into seq_len blocks and the last
partial epoch follow the recipe's arithmetic (`contract.dataset.planned_tokens`), so the plan's
total equals the `total_tokens` of the recipe's start event. Without a tokenizer, each rendered
text counts ~4 characters per token, and the plan says so.

A spec may instead give `data.examples` x `data.tokens_per_example`, to plan before the data is
at hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from contract.dataset import DataError, load_examples, planned_tokens, split_validation

CHARS_PER_TOKEN = 4.0

# The old name: callers catch it for a missing or malformed dataset file.
DatasetError = DataError


@dataclass(frozen=True)
class DatasetTokens:
    examples: int
    tokens: int                         # one pass over every example (training and validation)
    how: str                            # how the tokens were counted, for the plan's assumptions
    train_tokens: Optional[int] = None  # the training split, split as the recipe splits it; None for spec counts
    exact: bool = False                 # counted with the model's own tokenizer


class CharacterEstimate:
    """A stand-in tokenizer for `contract.dataset`: ~4 characters per token, one end-of-sequence
    token per example as nearly every model has, no chat template (conversations render in the
    plain '### Role:' format)."""

    bos_token = eos_token = chat_template = None
    eos_token_id = -1   # a token of its own, never a real id

    def __call__(self, texts: list[str], add_special_tokens: bool = False) -> dict:
        return {"input_ids": [[0] * math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts]}


def count_dataset_tokens(path: Path, tokenizer=None, *, fmt: str = "auto", seq_len: int = 2048,
                         completion_only_loss: bool = True, on_bad_line: str = "error",
                         validation_fraction: float = 0.0, seed: int = 42) -> DatasetTokens:
    """Read every example as the recipe does; bad data raises DataError naming the file and line."""
    path = Path(path)
    exact = tokenizer is not None
    examples, stats = load_examples(path, fmt, tokenizer if exact else CharacterEstimate(), seq_len,
                                    completion_only_loss, on_bad_line, check_length=exact)
    train, _ = split_validation(examples, validation_fraction, seed)
    if not train:
        raise DataError(f"{path}: no training examples left after holding out validation_fraction {validation_fraction}")
    skipped = sum(stats.skipped.values())
    note = f", {skipped} bad lines skipped" if skipped else ""
    how = (f"counted with {tokenizer.source}" if exact else
           f"estimated at ~{CHARS_PER_TOKEN:g} characters per token: no local tokenizer") + note
    return DatasetTokens(stats.examples, stats.tokens, how, sum(len(e.input_ids) for e in train), exact)


def dataset_tokens(spec, tokenizer=None) -> DatasetTokens:
    """The spec's dataset size: the JSONL file counted, or the spec's own counts when there is no
    file yet (a spec may carry both, to plan before the data is at hand)."""
    path = spec.data_path()
    has_counts = spec.data.examples is not None and spec.data.tokens_per_example is not None
    if path is None or (has_counts and not path.exists()):
        why = "" if path is None else f" ({path} does not exist yet)"
        return DatasetTokens(spec.data.examples, spec.data.examples * spec.data.tokens_per_example,
                             f"data.examples x data.tokens_per_example{why}")
    if not path.exists():
        raise DataError(f"dataset file not found: {path}")
    return count_dataset_tokens(path, tokenizer, fmt=spec.data.format, seq_len=spec.seq_len,
                                completion_only_loss=spec.data.completion_only_loss, on_bad_line=spec.data.on_bad_line,
                                validation_fraction=spec.data.validation_fraction, seed=spec.train.seed)


@dataclass(frozen=True)
class TrainingTokens:
    tokens: int                 # trained over the whole run
    capped_by_max_steps: bool
    steps: Optional[int] = None     # optimizer steps, where the dataset was read (the recipe's total_steps)
    blocks: Optional[int] = None    # packed seq_len blocks per epoch, likewise


def total_training_tokens(spec, dataset: DatasetTokens) -> TrainingTokens:
    """From a read dataset: the recipe's own steps over its packed training split. From spec
    counts: the training share x epochs, capped by train.max_steps x batch.global x seq_len."""
    max_steps = spec.train.max_steps or None
    if dataset.train_tokens is not None:
        run = planned_tokens(dataset.train_tokens, spec.seq_len, spec.epochs, spec.batch.global_, spec.train.seed, max_steps)
        uncapped = math.ceil(spec.epochs * run.blocks / spec.batch.global_)
        return TrainingTokens(run.tokens, max_steps is not None and max_steps < uncapped, run.total_steps, run.blocks)
    total = round(dataset.tokens * (1 - spec.data.validation_fraction) * spec.epochs)
    cap = max_steps * spec.batch.global_ * spec.seq_len if max_steps else None
    if cap is not None and cap < total:
        return TrainingTokens(cap, True)
    return TrainingTokens(total, False)
