"""How many tokens a job trains on: the dataset's tokens x epochs.

Dataset tokens come from the spec (`data.examples` x `data.tokens_per_example`) or by reading
the JSONL at `data.path`: with the model's own tokenizer when `tokenizers` is importable and a
tokenizer.json is on this machine, else ~4 characters per token (the plan says which).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from contract.errors import UserError

CHARS_PER_TOKEN = 4.0


class DatasetError(UserError):
    """The dataset file is missing or is not JSONL."""


@dataclass(frozen=True)
class DatasetTokens:
    examples: int
    tokens: int                # one pass over the training split
    how: str                   # how the tokens were counted, for the plan's assumptions


def _texts(value) -> list[str]:
    """Every string in one example (alpaca fields, chat message contents, text), in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in _texts(v)]
    return []


def read_jsonl_texts(path: Path, on_bad_line: str = "error") -> tuple[list[str], int]:
    """(one text per example, lines skipped). Raises DatasetError naming the file and line."""
    if not path.exists():
        raise DatasetError(f"dataset file not found: {path}")
    if path.is_dir():
        raise DatasetError(f"dataset path is a directory, not a JSONL file: {path}")
    texts, skipped = [], 0
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    example = json.loads(line)
                    if not isinstance(example, dict):
                        raise ValueError(f"a JSON {type(example).__name__}, not an object")
                except ValueError as e:
                    if on_bad_line == "skip":
                        skipped += 1
                        continue
                    raise DatasetError(f"{path}:{lineno}: not JSONL (one JSON object per line): {e}") from None
                texts.append("\n".join(_texts(example)))
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text, so not JSONL ({e.reason} at byte {e.start})") from None
    if not texts:
        raise DatasetError(f"{path}: no examples (an empty file, or every line skipped)")
    return texts, skipped


def _load_tokenizer(tokenizer_file: Optional[Path]):
    if tokenizer_file is None:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_file(str(tokenizer_file))
    except Exception:  # a corrupt or foreign tokenizer.json: fall back to the estimate, and say so
        return None


def count_dataset_tokens(path: Path, tokenizer_file: Optional[Path] = None, on_bad_line: str = "error",
                         byte_tokenizer: bool = False) -> DatasetTokens:
    texts, skipped = read_jsonl_texts(path, on_bad_line)
    note = f", {skipped} bad lines skipped" if skipped else ""
    if byte_tokenizer:
        tokens = sum(len(t.encode("utf-8")) for t in texts)
        return DatasetTokens(len(texts), tokens, f"counted as UTF-8 bytes: the model's tokenizer is byte-level{note}")
    tokenizer = _load_tokenizer(tokenizer_file)
    if tokenizer is not None:
        tokens = sum(len(e.ids) for e in tokenizer.encode_batch(texts))
        return DatasetTokens(len(texts), tokens, f"counted with {tokenizer_file}{note}")
    chars = sum(len(t) for t in texts)
    tokens = max(len(texts), round(chars / CHARS_PER_TOKEN))
    return DatasetTokens(len(texts), tokens,
                         f"estimated at ~{CHARS_PER_TOKEN:g} characters per token: no local tokenizer{note}")


def dataset_tokens(spec, tokenizer_file: Optional[Path] = None, byte_tokenizer: bool = False) -> DatasetTokens:
    """The spec's dataset size: the JSONL file counted, or the spec's own counts when there is no
    file yet (a spec may carry both, to plan before the data is at hand)."""
    path = spec.data_path()
    has_counts = spec.data.examples is not None and spec.data.tokens_per_example is not None
    if path is None or (has_counts and not path.exists()):
        why = "" if path is None else f" ({path} does not exist yet)"
        return DatasetTokens(spec.data.examples, spec.data.examples * spec.data.tokens_per_example,
                             f"data.examples x data.tokens_per_example{why}")
    return count_dataset_tokens(path, tokenizer_file, spec.data.on_bad_line, byte_tokenizer)


def total_training_tokens(spec, dataset: DatasetTokens) -> int:
    """Tokens trained: the training split (validation held out) x epochs."""
    return round(dataset.tokens * (1 - spec.data.validation_fraction) * spec.epochs)
