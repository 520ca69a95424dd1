"""Training data, torch-free: JSONL records -> tokenized examples, read identically by the recipe
(which then packs them into blocks) and by the planner (which counts what the recipe will train).

Formats (one JSON object per line; `auto` detects from the first record, then every line must
match it):
  alpaca  {"instruction", "input" (optional), "output", "system" (optional)}
  chat    {"messages": [{"role": system|user|assistant, "content"}]} (OpenAI/Together; an
          assistant message may carry "weight": 0 to exclude it from the loss), or ShareGPT
          {"conversations": [{"from": system|human|gpt|user|assistant, "value"}]}
  text    {"text"}

Alpaca records become a user/assistant conversation. Conversations are rendered with the
tokenizer's chat template when it has one, else a plain "### Role:" format. Rendering yields
segments (text, trained?) that are tokenized one by one, so prompt tokens get label -100
exactly (with data.completion_only_loss). EOS is appended unless the last completion already
contains it (a template that closes the assistant turn with eos). The first token of every
example has label -100: in a packed block it would otherwise be predicted from the previous
document.

Length rule: a chat/alpaca example longer than seq_len is a bad line (error naming file and
line, or a counted skip with data.on_bad_line=skip), since the model could never see its
prompt and answer together. A `text` document is split into seq_len pieces instead: every
piece is still useful language-model data.

The tokenizer is any object with `bos_token`, `eos_token`, `eos_token_id`, `chat_template`,
`apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` and
`__call__(texts, add_special_tokens=False)["input_ids"]`: transformers' tokenizers on the node,
`contract.tokenizer.FileTokenizer` (tokenizers + jinja2, no torch) in the planner.

Packing (recipes/data.py) streams examples into seq_len blocks that are full except the last,
so what one epoch trains follows from the training split's token count alone; `planned_tokens`
turns that into the tokens a whole run trains, with the recipe's block order (`block_order`).
"""
from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from contract.errors import UserError
from contract.files import FileInputError, iter_lines, loads_json, open_regular

log = logging.getLogger(__name__)

Format = Literal["alpaca", "chat", "text"]
FORMATS = ("auto", "alpaca", "chat", "text")
IGNORE_INDEX = -100
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_CHAT_ROLES = ("system", "user", "assistant")
_FALLBACK_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}


class DataError(UserError):
    """Bad training data, worded as one line naming the file and, where it applies, the line."""


class _BadLine(Exception):
    """One line's problem; `reason` is the counter key for skip statistics."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    line: int  # 1-based line in the source file


@dataclass
class DataStats:
    path: str
    format: str
    lines: int = 0  # non-empty lines read
    examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_first: list[str] = field(default_factory=list)  # the first few skip messages
    tokens: int = 0
    target_tokens: int = 0  # tokens with a label (what the loss is computed on)
    longest: int = 0
    text_pieces: int = 0  # extra pieces made by splitting long `text` documents
    train_examples: int = 0
    val_examples: int = 0
    train_blocks: int = 0
    val_blocks: int = 0
    padding_tokens: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def detect_format(record: object) -> Format:
    if not isinstance(record, dict):
        raise _BadLine("missing_fields", f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record or "conversations" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "text" in record:
        return "text"
    keys = ", ".join(sorted(record)[:6]) or "none"
    raise _BadLine("missing_fields", "cannot detect the format: expected 'messages', 'conversations', "
                   f"'instruction'+'output' or 'text' (keys: {keys})")


def _string(record: dict, key: str, *, required: bool = True, where: str = "") -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "missing" if value is None else f"not a string ({type(value).__name__})"
        raise _BadLine("missing_fields", f"field '{where}{key}' is {what}")
    return value


def _content(message: dict, key: str, where: str) -> str:
    value = message.get(key)
    if isinstance(value, list):  # OpenAI content parts: only text parts can be trained on
        texts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type") == "text"]
        if len(texts) != len(value) or not all(isinstance(t, str) for t in texts):
            raise _BadLine("missing_fields", f"field '{where}{key}' has non-text parts")
        return "".join(texts)
    return _string(message, key, where=where)


def _conversation(record: object, fmt: Format) -> list[dict]:
    """Normalize an alpaca or chat record to [{"role", "content", "train"}]."""
    if not isinstance(record, dict):
        raise _BadLine("missing_fields", f"expected a JSON object, got {type(record).__name__}")
    if fmt == "alpaca":
        instruction = _string(record, "instruction")
        extra_input = _string(record, "input", required=False)
        system = _string(record, "system", required=False)
        user = f"{instruction}\n\n{extra_input}" if extra_input else instruction
        turns = [{"role": "system", "content": system, "train": False}] if system else []
        return turns + [{"role": "user", "content": user, "train": False},
                        {"role": "assistant", "content": _string(record, "output"), "train": True}]
    if "messages" in record:
        key, role_key, text_key, roles = "messages", "role", "content", {r: r for r in _CHAT_ROLES}
    elif "conversations" in record:
        key, role_key, text_key, roles = "conversations", "from", "value", _SHAREGPT_ROLES
    else:
        raise _BadLine("missing_fields", "field 'messages' (or ShareGPT 'conversations') is missing")
    messages = record[key]
    if not isinstance(messages, list) or not messages:
        raise _BadLine("missing_fields", f"field '{key}' must be a non-empty list")
    turns = []
    for i, message in enumerate(messages):
        where = f"{key}[{i}]."
        if not isinstance(message, dict):
            raise _BadLine("missing_fields", f"'{key}[{i}]' is not an object")
        role = roles.get(message.get(role_key))
        if role is None:
            raise _BadLine("missing_fields", f"field '{where}{role_key}' must be one of {', '.join(roles)}, "
                           f"got {message.get(role_key)!r}")
        weight = message.get("weight", 1)
        if weight not in (0, 1):
            raise _BadLine("missing_fields", f"field '{where}weight' must be 0 or 1")
        turns.append({"role": role, "content": _content(message, text_key, where), "train": role == "assistant" and weight == 1})
    if not any(t["role"] == "assistant" for t in turns):
        raise _BadLine("missing_fields", f"'{key}' has no assistant message to learn from")
    return turns


def _render_template(tokenizer, turns: list[dict], add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError

    messages = [{"role": t["role"], "content": t["content"]} for t in turns]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise _BadLine("template", f"the tokenizer's chat template rejects this conversation: {e}") from None


def _template_segments(tokenizer, turns: list[dict]) -> list[tuple[str, bool]]:
    """Split the template's rendering at each assistant turn's start and end.

    Relies on the rendering of a conversation prefix being a string prefix of the whole,
    which holds for common templates (Llama 3, Qwen 2.5, Mistral, Gemma).
    """
    full = _render_template(tokenizer, turns, add_generation_prompt=False)
    segments: list[tuple[str, bool]] = []
    done = 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        start = _render_template(tokenizer, turns[:i], add_generation_prompt=True) if i else ""
        end = _render_template(tokenizer, turns[: i + 1], add_generation_prompt=False)
        if not (full.startswith(end) and end.startswith(start) and len(start) >= done):
            raise _BadLine("template", "the tokenizer's chat template does not render a conversation prefix as a "
                           "prefix of the whole, so prompt and completion tokens cannot be told apart")
        segments += [(full[done:len(start)], False), (full[len(start):len(end)], turn["train"])]
        done = len(end)
    segments.append((full[done:], False))
    return segments


def _fallback_segments(tokenizer, turns: list[dict]) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = [(tokenizer.bos_token or "", False)]
    for turn in turns:
        header = _FALLBACK_HEADERS[turn["role"]]
        if turn["role"] == "assistant":
            segments += [(header, False), (turn["content"] + (tokenizer.eos_token or ""), turn["train"]), ("\n\n", False)]
        else:
            segments.append((header + turn["content"] + "\n\n", False))
    if segments[-1] == ("\n\n", False):
        segments.pop()  # the conversation ends on the assistant's eos
    return segments


def _segments(record: object, fmt: Format, tokenizer) -> list[tuple[str, bool]]:
    if fmt == "text":
        if not isinstance(record, dict):
            raise _BadLine("missing_fields", f"expected a JSON object, got {type(record).__name__}")
        return [(tokenizer.bos_token or "", False), (_string(record, "text"), True)]
    turns = _conversation(record, fmt)
    if getattr(tokenizer, "chat_template", None):
        return _template_segments(tokenizer, turns)
    return _fallback_segments(tokenizer, turns)


def _tokenize(segments: list[tuple[str, bool]], tokenizer, completion_only_loss: bool) -> tuple[list[int], list[int]]:
    texts = [text for text, _ in segments if text]
    trained = [train for text, train in segments if text]
    tokenized = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    input_ids: list[int] = []
    labels: list[int] = []
    for ids, train in zip(tokenized, trained):
        input_ids += ids
        labels += ids if (train or not completion_only_loss) else [IGNORE_INDEX] * len(ids)
    eos = tokenizer.eos_token_id
    completions = [ids for ids, train in zip(tokenized, trained) if train]
    # Templates that close the assistant turn with eos (Qwen's "<|im_end|>\n") need no second one.
    already_stops = bool(completions) and eos in completions[-1]
    if eos is not None and not already_stops and (not input_ids or input_ids[-1] != eos):
        last_trained = bool(labels) and labels[-1] != IGNORE_INDEX
        input_ids.append(eos)
        labels.append(eos if (last_trained or not completion_only_loss) else IGNORE_INDEX)
    if labels:
        labels[0] = IGNORE_INDEX
    return input_ids, labels


def _split_text(input_ids: list[int], labels: list[int], seq_len: int) -> list[tuple[list[int], list[int]]]:
    pieces = []
    for start in range(0, len(input_ids), seq_len):
        piece_labels = labels[start:start + seq_len]
        piece_labels[0] = IGNORE_INDEX
        pieces.append((input_ids[start:start + seq_len], piece_labels))
    return pieces


def _open_data(path: Path):
    """The data file, opened only if it is a regular file (contract/files.py: no FIFO, no /dev/zero)."""
    try:
        return open_regular(path, "data file")
    except FileInputError as e:
        raise DataError(str(e)) from None


def _records(f, path: Path):
    """(line number, parsed record, None) for every non-empty line, or (line, None, (reason, why)).
    Lines are bounded in bytes and JSON in depth, so no line can exhaust memory or the stack.
    Closes `f` when done, or when the caller stops early (a bad line raised)."""
    with f:
        try:
            for line_no, raw in iter_lines(f, path, "data file"):
                try:
                    text_line = raw.decode("utf-8").strip()
                except UnicodeDecodeError as e:
                    yield line_no, None, ("not_json", f"not valid UTF-8 ({e.reason} at byte {e.start})")
                    continue
                if not text_line:
                    continue
                try:
                    yield line_no, loads_json(text_line), None
                except json.JSONDecodeError as e:
                    yield line_no, None, ("not_json", f"not valid JSON ({e.msg} at column {e.colno})")
        except FileInputError as e:
            raise DataError(str(e)) from None


def load_examples(path: Path | str, fmt: str, tokenizer, seq_len: int, completion_only_loss: bool = True,
                  on_bad_line: str = "error", check_length: bool = True) -> tuple[list[Example], DataStats]:
    """Read and tokenize every line; bad lines raise DataError("file:line: ...") or are counted and skipped.

    `check_length=False` keeps over-long chat/alpaca examples: for a tokenizer that only estimates."""
    path = Path(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r} (expected auto, alpaca, chat or text)")
    data_file = _open_data(path)
    stats = DataStats(path=str(path), format=fmt)
    skipped: Counter = Counter()
    examples: list[Example] = []
    detected: Optional[Format] = None if fmt == "auto" else fmt  # type: ignore[assignment]

    def bad(line_no: int, reason: str, message: str) -> None:
        full = f"{path}:{line_no}: {message}"
        if on_bad_line != "skip":
            raise DataError(full)
        skipped[reason] += 1
        if len(stats.skipped_first) < 5:
            stats.skipped_first.append(full)

    for line_no, record, problem in _records(data_file, path):
        stats.lines += 1
        if problem is not None:
            bad(line_no, *problem)
            continue
        try:
            if detected is None:
                detected = detect_format(record)
            input_ids, labels = _tokenize(_segments(record, detected, tokenizer), tokenizer, completion_only_loss)
            if check_length and detected != "text" and len(input_ids) > seq_len:
                raise _BadLine("too_long", f"example is {len(input_ids)} tokens, longer than seq_len {seq_len} "
                               "(raise seq_len, shorten it, or set data.on_bad_line: skip)")
            if completion_only_loss and all(label == IGNORE_INDEX for label in labels):
                raise _BadLine("missing_fields", "example has no tokens to learn from (empty completion)")
        except _BadLine as e:
            bad(line_no, e.reason, str(e))
            continue
        pieces = _split_text(input_ids, labels, seq_len) if detected == "text" else [(input_ids, labels)]
        stats.text_pieces += len(pieces) - 1
        for ids, labs in pieces:
            examples.append(Example(ids, labs, line_no))
            stats.tokens += len(ids)
            stats.target_tokens += sum(1 for label in labs if label != IGNORE_INDEX)
            stats.longest = max(stats.longest, len(ids))

    stats.format = detected or fmt
    stats.skipped = dict(skipped)
    stats.examples = len(examples)
    if not examples:
        reason = f" ({sum(skipped.values())} bad lines skipped)" if skipped else ""
        raise DataError(f"{path}: no training examples{reason}")
    if skipped:
        log.warning("%s: skipped %d of %d lines (%s); first: %s", path, sum(skipped.values()), stats.lines,
                    ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items())), stats.skipped_first[0])
    return examples, stats


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out `fraction` of the source lines (all pieces of a line go to the same side), by seed."""
    if fraction <= 0:
        return examples, []
    lines = sorted({e.line for e in examples})
    n_val = max(1, round(len(lines) * fraction)) if len(lines) > 1 else 0
    held_out = set(random.Random(seed).sample(lines, n_val))
    return [e for e in examples if e.line not in held_out], [e for e in examples if e.line in held_out]


def block_order(n_blocks: int, seed: int, epoch: int) -> list[int]:
    """The order one epoch visits the packed blocks: a permutation seeded by (seed, epoch), the
    same on every machine, so a resumed run continues exactly and the planner knows what a
    run's last, partial epoch holds."""
    order = list(range(n_blocks))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


@dataclass(frozen=True)
class PlannedRun:
    """What a run over `train_tokens` of packed training data does: the recipe's own arithmetic."""

    blocks: int            # packed seq_len blocks per epoch (the last one may be part padding)
    total_steps: int
    tokens: int            # tokens trained over all steps, padding excluded


def planned_tokens(train_tokens: int, seq_len: int, epochs: float, global_batch: int, seed: int,
                   max_steps: Optional[int] = None) -> PlannedRun:
    """Steps and trained tokens for `train_tokens` tokens of training examples.

    Packing fills every block but the last, so block i holds seq_len tokens except the last,
    which holds the rest. Each step takes `global_batch` blocks from the per-epoch order; the
    last step may reach into one more epoch, whose first blocks (by `block_order`) count too."""
    n_blocks = max(1, math.ceil(train_tokens / seq_len))
    last_block = train_tokens - (n_blocks - 1) * seq_len
    total_steps = max_steps or math.ceil(epochs * n_blocks / global_batch)
    full_epochs, remainder = divmod(total_steps * global_batch, n_blocks)
    partial = sum(last_block if i == n_blocks - 1 else seq_len
                  for i in block_order(n_blocks, seed, full_epochs)[:remainder])
    return PlannedRun(n_blocks, total_steps, train_tokens * full_epochs + partial)
