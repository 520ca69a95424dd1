"""Training data on the node: examples (read by `contract.dataset`, the same code the planner
counts with) -> packed `seq_len` blocks.

Packing streams the examples in file order into seq_len blocks with no padding except in the
last block; an example that reaches past a block's end continues at the start of the next.
Each block carries `position_ids` restarting at 0 at every document start and `document_ids`
(the example's index in the file's example list, -1 for padding), so the train loop can keep
attention within documents. Shuffling is the train loop's job (seeded, `contract.dataset.block_order`),
so resume is exact.
"""
from __future__ import annotations

from typing import Iterable

# Formats, rendering, masks and the length rule live in the contract, so the planner counts
# exactly what trains; they are re-exported here for the recipe's callers.
from contract.dataset import (IGNORE_INDEX, DataError, DataStats, Example, detect_format,  # noqa: F401
                              load_examples, split_validation)


def pack(examples: Iterable[Example], seq_len: int, pad_id: int, drop_last: bool = False,
         document_offset: int = 0) -> list[dict[str, list[int]]]:
    """Stream examples into seq_len blocks: no padding except in the last block (or drop it).

    `document_ids` are the example's position in `examples` (+ document_offset); -1 marks padding.
    """
    blocks: list[dict[str, list[int]]] = []
    current = _empty_block()
    for doc, example in enumerate(examples, start=document_offset):
        offset = 0
        while offset < len(example.input_ids):
            take = min(seq_len - len(current["input_ids"]), len(example.input_ids) - offset)
            current["input_ids"] += example.input_ids[offset:offset + take]
            labels = example.labels[offset:offset + take]
            if offset:
                # A continuation cannot see its first token's predecessor (previous block).
                labels[0] = IGNORE_INDEX
            current["labels"] += labels
            current["position_ids"] += range(take)
            current["document_ids"] += [doc] * take
            offset += take
            if len(current["input_ids"]) == seq_len:
                blocks.append(current)
                current = _empty_block()
    if current["input_ids"] and not drop_last:
        pad = seq_len - len(current["input_ids"])
        current["input_ids"] += [pad_id] * pad
        current["labels"] += [IGNORE_INDEX] * pad
        current["position_ids"] += range(pad)
        current["document_ids"] += [-1] * pad
        blocks.append(current)
    return blocks


def _empty_block() -> dict[str, list[int]]:
    return {"input_ids": [], "labels": [], "position_ids": [], "document_ids": []}


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def build_datasets(cfg, tokenizer) -> tuple[list[dict[str, list[int]]], list[dict[str, list[int]]], DataStats]:
    """From a JobSpec: (train_blocks, val_blocks, stats). Raises DataError before any training starts."""
    examples, stats = load_examples(cfg.data_path(), cfg.data.format, tokenizer, cfg.seq_len,
                                    cfg.data.completion_only_loss, cfg.data.on_bad_line)
    train, val = split_validation(examples, cfg.data.validation_fraction, cfg.train.seed)
    if not train:
        raise DataError(f"{stats.path}: no training examples left after holding out validation_fraction "
                        f"{cfg.data.validation_fraction}")
    pad = pad_token_id(tokenizer)
    train_blocks = pack(train, cfg.seq_len, pad)
    val_blocks = pack(val, cfg.seq_len, pad, document_offset=len(train))
    stats.train_examples, stats.val_examples = len(train), len(val)
    stats.train_blocks, stats.val_blocks = len(train_blocks), len(val_blocks)
    stats.padding_tokens = sum(b["document_ids"].count(-1) for b in train_blocks + val_blocks)
    return train_blocks, val_blocks, stats
