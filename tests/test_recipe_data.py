"""recipes/data.py: formats, completion-only masks, packing, bad lines, validation split."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from contract.spec import load_spec  # noqa: E402
from recipes.data import (  # noqa: E402
    IGNORE_INDEX, DataError, Example, build_datasets, detect_format, load_examples, pack, split_validation,
)
from recipes.tiny import build_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "recipes" / "configs" / "tiny-demo.yaml"
DEMO_DATA = REPO / "recipes" / "sample_data" / "json_demo.jsonl"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def plain_tokenizer():
    """The same byte tokenizer without a chat template: conversations use the '### Role:' fallback."""
    tok = build_tokenizer()
    tok.chat_template = None
    return tok


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def trained_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])


def load_one(tmp_path, tokenizer, record, fmt="auto", seq_len=512, **kw) -> Example:
    examples, _ = load_examples(write_jsonl(tmp_path / "one.jsonl", [record]), fmt, tokenizer, seq_len, **kw)
    assert len(examples) == 1
    return examples[0]


ALPACA = {"instruction": "Convert to JSON.", "input": "Play Halo by Beyonce", "output": '{"intent":"play_music"}'}
MESSAGES = {"messages": [
    {"role": "system", "content": "You output JSON."},
    {"role": "user", "content": "Play Halo"},
    {"role": "assistant", "content": '{"song":"Halo"}'},
    {"role": "user", "content": "And Yellow?"},
    {"role": "assistant", "content": '{"song":"Yellow"}'},
]}
SHAREGPT = {"conversations": [
    {"from": "system", "value": "You output JSON."},
    {"from": "human", "value": "Play Halo"},
    {"from": "gpt", "value": '{"song":"Halo"}'},
    {"from": "human", "value": "And Yellow?"},
    {"from": "gpt", "value": '{"song":"Yellow"}'},
]}


@pytest.mark.parametrize("record, expected", [
    (ALPACA, "alpaca"),
    ({"instruction": "Say hi", "output": "hi"}, "alpaca"),
    (MESSAGES, "chat"),
    (SHAREGPT, "chat"),
    ({"text": "Once upon a time"}, "text"),
])
def test_format_is_detected_from_the_record_keys(record, expected):
    assert detect_format(record) == expected


def test_auto_detects_from_the_first_line_and_holds_every_line_to_it(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "mixed.jsonl", [ALPACA, {"text": "plain text"}])
    with pytest.raises(DataError, match=r"mixed\.jsonl:2: field 'instruction' is missing"):
        load_examples(path, "auto", tokenizer, 512)


def test_alpaca_loss_covers_only_the_output_and_eos(tmp_path, tokenizer):
    example = load_one(tmp_path, tokenizer, ALPACA)
    assert trained_text(tokenizer, example) == ALPACA["output"] + tokenizer.eos_token
    assert example.input_ids[-1] == tokenizer.eos_token_id
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    prompt = tokenizer.decode(example.input_ids[:first_trained])
    assert prompt == tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{ALPACA['instruction']}\n\n{ALPACA['input']}"}],
        tokenize=False, add_generation_prompt=True)
    assert all(label == IGNORE_INDEX for label in example.labels[:first_trained])
    assert example.labels[first_trained:] == example.input_ids[first_trained:]


def test_without_completion_only_loss_every_token_but_the_first_is_trained(tmp_path, tokenizer):
    example = load_one(tmp_path, tokenizer, ALPACA, completion_only_loss=False)
    assert example.labels[0] == IGNORE_INDEX
    assert example.labels[1:] == example.input_ids[1:]


def test_every_assistant_turn_is_trained_and_nothing_else(tmp_path, tokenizer):
    example = load_one(tmp_path, tokenizer, MESSAGES)
    eos = tokenizer.eos_token
    assert trained_text(tokenizer, example) == '{"song":"Halo"}' + eos + '{"song":"Yellow"}' + eos
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(
        MESSAGES["messages"], tokenize=False)


def test_sharegpt_conversations_equal_the_same_messages(tmp_path, tokenizer):
    from_messages = load_one(tmp_path, tokenizer, MESSAGES)
    from_sharegpt = load_one(tmp_path, tokenizer, SHAREGPT)
    assert (from_sharegpt.input_ids, from_sharegpt.labels) == (from_messages.input_ids, from_messages.labels)


def test_assistant_message_with_weight_zero_is_not_trained(tmp_path, tokenizer):
    record = json.loads(json.dumps(MESSAGES))
    record["messages"][2]["weight"] = 0
    assert trained_text(tokenizer, load_one(tmp_path, tokenizer, record)) == '{"song":"Yellow"}' + tokenizer.eos_token


def test_openai_text_content_parts_are_joined(tmp_path, tokenizer):
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Play "}, {"type": "text", "text": "Halo"}]},
                           {"role": "assistant", "content": "ok"}]}
    example = load_one(tmp_path, tokenizer, record)
    assert "Play Halo" in tokenizer.decode(example.input_ids)


def test_without_a_chat_template_conversations_use_the_plain_format(tmp_path, plain_tokenizer):
    example = load_one(tmp_path, plain_tokenizer, MESSAGES)
    text = plain_tokenizer.decode(example.input_ids)
    assert text.startswith(plain_tokenizer.bos_token + "### System:\nYou output JSON.\n\n### User:\nPlay Halo\n\n### Assistant:\n")
    assert text.endswith('### Assistant:\n{"song":"Yellow"}' + plain_tokenizer.eos_token)
    eos = plain_tokenizer.eos_token
    assert trained_text(plain_tokenizer, example) == '{"song":"Halo"}' + eos + '{"song":"Yellow"}' + eos


def test_text_is_trained_whole_with_bos_and_one_eos(tmp_path, tokenizer):
    example = load_one(tmp_path, tokenizer, {"text": "hello world"})
    assert tokenizer.decode(example.input_ids) == tokenizer.bos_token + "hello world" + tokenizer.eos_token
    assert example.labels[0] == IGNORE_INDEX and example.labels[1:] == example.input_ids[1:]


def test_text_longer_than_seq_len_is_split_into_pieces_not_rejected(tmp_path, tokenizer):
    examples, stats = load_examples(write_jsonl(tmp_path / "long.jsonl", [{"text": "x" * 100}]), "text", tokenizer, 32)
    assert [len(e.input_ids) for e in examples] == [32, 32, 32, 6]  # bos + 100 bytes + eos
    assert stats.text_pieces == 3 and {e.line for e in examples} == {1}
    assert all(e.labels[0] == IGNORE_INDEX for e in examples)


QWEN_STYLE_TEMPLATE = (  # Qwen 2.5's shape: a default system prompt, turns closed by "<|im_end|>\n"
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' or not loop.first %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_a_template_that_closes_turns_with_eos_gets_no_second_eos(tmp_path):
    tok = build_tokenizer()
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    tok.chat_template = QWEN_STYLE_TEMPLATE
    record = {"messages": MESSAGES["messages"][1:]}  # no system message: the template adds its default
    example = load_one(tmp_path, tok, record)
    assert tok.decode(example.input_ids) == tok.apply_chat_template(record["messages"], tokenize=False)
    assert tok.decode(example.input_ids).startswith("<|im_start|>system\nYou are a helpful assistant.")
    assert trained_text(tok, example) == '{"song":"Halo"}<|im_end|>\n{"song":"Yellow"}<|im_end|>\n'


def test_a_template_that_does_not_render_prefixes_as_prefixes_is_an_error(tmp_path):
    tok = build_tokenizer()
    tok.chat_template = "{% for m in messages|reverse %}{{ m['content'] }}|{% endfor %}"
    with pytest.raises(DataError, match=r"one\.jsonl:1: .*chat template does not render a conversation prefix"):
        load_one(tmp_path, tok, MESSAGES)


@pytest.mark.parametrize("bad_line, message", [
    ('{"instruction": "x", "output": ', r"not valid JSON"),
    ('{"instruction": "x"}', r"field 'output' is missing"),
    ('{"instruction": "x", "output": 5}', r"field 'output' is not a string \(int\)"),
    ('[1, 2]', r"expected a JSON object, got list"),
    ('{"instruction": "x", "output": "' + "y" * 300 + '"}', r"example is \d+ tokens, longer than seq_len 128"),
])
def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path, tokenizer, bad_line, message):
    path = write_jsonl(tmp_path / "train.jsonl", [ALPACA, "", bad_line, ALPACA])
    with pytest.raises(DataError, match=rf"^{tmp_path}/train\.jsonl:3: {message}"):
        load_examples(path, "alpaca", tokenizer, 128)


@pytest.mark.parametrize("bad_record, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, r"'messages' has no assistant message"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"field 'messages\[0\]\.role' must be one of"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}, r"field 'conversations\[0\]\.value' is missing"),
    ({"messages": []}, r"field 'messages' must be a non-empty list"),
])
def test_a_bad_conversation_names_the_line_and_the_field(tmp_path, tokenizer, bad_record, message):
    path = write_jsonl(tmp_path / "chat.jsonl", [MESSAGES, bad_record])
    with pytest.raises(DataError, match=rf"chat\.jsonl:2: {message}"):
        load_examples(path, "chat", tokenizer, 512)


def test_an_unrecognised_first_line_names_the_keys_it_has(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match=r"odd\.jsonl:1: cannot detect the format.*keys: prompt, response"):
        load_examples(path, "auto", tokenizer, 512)


def test_skip_mode_counts_bad_lines_and_keeps_the_good_ones(tmp_path, tokenizer, caplog):
    lines = [ALPACA, "not json", {"instruction": "x"}, ALPACA, {"instruction": "x", "output": "y" * 300}, ALPACA]
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    examples, stats = load_examples(path, "auto", tokenizer, 128, on_bad_line="skip")
    assert [e.line for e in examples] == [1, 4, 6]
    assert stats.skipped == {"not_json": 1, "missing_fields": 1, "too_long": 1}
    assert stats.lines == 6 and stats.examples == 3
    assert stats.skipped_first[0].startswith(f"{path}:2: not valid JSON")
    assert "skipped 3 of 6 lines" in caplog.text


def test_a_file_with_no_usable_example_is_an_error(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"empty\.jsonl: no training examples"):
        load_examples(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]), "auto", tokenizer, 128)
    with pytest.raises(DataError, match=r"data file not found"):
        load_examples(tmp_path / "missing.jsonl", "auto", tokenizer, 128)


def _examples(lengths: list[int]) -> list[Example]:
    examples, token = [], 1000
    for n, length in enumerate(lengths):
        ids = list(range(token, token + length))
        token += length
        examples.append(Example(ids, [IGNORE_INDEX] + ids[1:], n + 1))
    return examples


def test_packing_pads_only_the_last_block_and_restarts_positions_per_document():
    examples = _examples([5, 9, 3, 12, 7, 1, 6])  # 43 tokens into blocks of 10
    blocks = pack(examples, seq_len=10, pad_id=0)
    assert len(blocks) == 5
    assert all(len(b[key]) == 10 for b in blocks for key in b)
    assert all(-1 not in b["document_ids"] for b in blocks[:-1])
    assert blocks[-1]["document_ids"][-7:] == [-1] * 7 and blocks[-1]["labels"][-7:] == [IGNORE_INDEX] * 7
    for block in blocks:
        for i, (doc, position) in enumerate(zip(block["document_ids"], block["position_ids"])):
            starts_document = i == 0 or block["document_ids"][i - 1] != doc
            assert position == (0 if starts_document else block["position_ids"][i - 1] + 1)
    assert blocks[0]["position_ids"] == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]


def test_packing_keeps_every_token_of_every_example_exactly_once_in_order():
    examples = _examples([5, 9, 3, 12, 7, 1, 6, 25])
    blocks = pack(examples, seq_len=10, pad_id=0)
    rebuilt: dict[int, list[int]] = {}
    for block in blocks:
        for token, doc in zip(block["input_ids"], block["document_ids"]):
            if doc >= 0:
                rebuilt.setdefault(doc, []).append(token)
    assert rebuilt == {n: e.input_ids for n, e in enumerate(examples)}


def test_a_document_continued_in_the_next_block_is_not_trained_across_the_cut():
    blocks = pack(_examples([15]), seq_len=10, pad_id=0)
    assert blocks[1]["labels"][0] == IGNORE_INDEX and blocks[1]["labels"][1:5] == blocks[1]["input_ids"][1:5]
    assert blocks[1]["position_ids"][:5] == [0, 1, 2, 3, 4]


def test_packing_can_drop_the_short_last_block():
    blocks = pack(_examples([8, 8]), seq_len=10, pad_id=0, drop_last=True)
    assert len(blocks) == 1 and -1 not in blocks[0]["document_ids"]


def test_validation_split_is_deterministic_disjoint_and_sized_by_fraction():
    examples = _examples([3] * 100)
    train, val = split_validation(examples, 0.1, seed=42)
    again_train, again_val = split_validation(examples, 0.1, seed=42)
    _, other_val = split_validation(examples, 0.1, seed=7)
    assert len(val) == 10 and len(train) == 90
    assert [e.line for e in val] == [e.line for e in again_val] and [e.line for e in train] == [e.line for e in again_train]
    assert {e.line for e in val} != {e.line for e in other_val}
    assert not {e.line for e in val} & {e.line for e in train}
    assert split_validation(examples, 0.0, seed=42) == (examples, [])


def test_the_demo_config_builds_train_and_validation_blocks(tokenizer):
    cfg = load_spec(DEMO_CONFIG, for_training=True)
    train, val, stats = build_datasets(cfg, tokenizer)
    assert stats.format == "alpaca" and stats.examples == stats.lines == 400 and stats.skipped == {}
    assert stats.val_examples == 20 and stats.train_examples == 380
    assert len(train) == stats.train_blocks and len(val) == stats.val_blocks
    assert all(len(b["input_ids"]) == cfg.seq_len for b in train + val)
    train_docs = {d for b in train for d in b["document_ids"] if d >= 0}
    val_docs = {d for b in val for d in b["document_ids"] if d >= 0}
    assert len(train_docs) == 380 and len(val_docs) == 20 and not train_docs & val_docs
    assert stats.longest <= cfg.seq_len


def test_the_committed_demo_dataset_is_what_the_generator_writes():
    generated = subprocess.run([sys.executable, str(DEMO_DATA.parent / "make_json_demo.py")],
                               capture_output=True, text=True, check=True).stdout
    assert generated == DEMO_DATA.read_text()
