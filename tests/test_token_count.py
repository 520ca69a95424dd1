"""The plan counts what the recipe trains: the same parsing (contract/dataset.py), the model's real
tokenizer without torch (contract/tokenizer.py) agreeing token for token with transformers', and the
recipe's packing and block order, so the plan's total equals the recipe's start event."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from contract.dataset import load_examples, planned_tokens
from contract.spec import load_spec
from contract.tokenizer import FileTokenizer
from orchestrator.planner import resolve_job
from waiting import wait_until

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
DEMO_SPEC = REPO / "recipes" / "configs" / "tiny-demo.yaml"
DEMO_DATA = REPO / "recipes" / "sample_data" / "json_demo.jsonl"

# Qwen2.5's ChatML template without the tool branches: whitespace control ({%- -%}), a default
# system turn and the eos (<|im_end|>) inside each assistant turn, which trim_blocks/lstrip_blocks
# and the "no second eos" rule must both get right.
CHATML = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
CHAT_RECORDS = [
    {"messages": [{"role": "system", "content": "You output JSON."}, {"role": "user", "content": "Play Halo"},
                  {"role": "assistant", "content": '{"song":"Halo"}'}, {"role": "user", "content": "And Yellow?"},
                  {"role": "assistant", "content": '{"song":"Yellow"}'}]},
    {"conversations": [{"from": "human", "value": "Wake me at 7"}, {"from": "gpt", "value": '{"alarm":"07:00"}'}]},
    {"messages": [{"role": "user", "content": "Text Gus: dinner"},
                  {"role": "assistant", "content": "ok", "weight": 0},
                  {"role": "user", "content": "again"}, {"role": "assistant", "content": '{"to":"Gus"}'}]},
]


def same_examples(a, b) -> bool:
    return [(e.input_ids, e.labels, e.line) for e in a] == [(e.input_ids, e.labels, e.line) for e in b]


def test_tiny_llamas_torch_free_tokenizer_reads_the_demo_data_exactly_as_the_recipes():
    from recipes.tiny import build_tokenizer

    ours, ours_stats = load_examples(DEMO_DATA, "auto", FileTokenizer.tiny(), 256)
    theirs, theirs_stats = load_examples(DEMO_DATA, "auto", build_tokenizer(), 256)
    assert same_examples(ours, theirs) and ours_stats.tokens == theirs_stats.tokens == 56_521


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory):
    """A byte-level BPE trained on the demo data, with Qwen's special tokens and ChatML template,
    saved by transformers as a model directory is (tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train([str(DEMO_DATA)], trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                                     pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    directory = tmp_path_factory.mktemp("chatml")
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("records", [CHAT_RECORDS, "demo"], ids=["chat-and-sharegpt", "alpaca-demo"])
def test_a_saved_tokenizer_with_a_chat_template_counts_as_transformers_does(tmp_path, chatml_dir, records):
    path = DEMO_DATA if records == "demo" else tmp_path / "chat.jsonl"
    if records != "demo":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert (chatml_dir / "chat_template.jinja").is_file()
    ours, _ = load_examples(path, "auto", FileTokenizer.from_dir(chatml_dir), 512)
    theirs, _ = load_examples(path, "auto", transformers.AutoTokenizer.from_pretrained(chatml_dir), 512)
    assert same_examples(ours, theirs)


def test_a_chat_template_kept_in_tokenizer_config_json_is_read_too(tmp_path, chatml_dir):
    legacy = tmp_path / "legacy"
    shutil.copytree(chatml_dir, legacy)
    template = (legacy / "chat_template.jinja").read_text()
    (legacy / "chat_template.jinja").unlink()
    config = json.loads((legacy / "tokenizer_config.json").read_text())
    (legacy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    assert FileTokenizer.from_dir(legacy).chat_template == template


def test_the_block_order_is_the_trainers_so_a_partial_last_epoch_is_counted_exactly():
    import torch

    from recipes.trainer import DataOrder

    order = DataOrder(n_blocks=7, seed=42)
    run = planned_tokens(train_tokens=7 * 100 - 30, seq_len=100, epochs=1.5, global_batch=4, seed=42)
    block_tokens = torch.tensor([100] * 6 + [70])
    full, remainder = divmod(run.total_steps * 4, 7)
    assert run.tokens == int(block_tokens.sum()) * full + int(block_tokens[order.permutation(full)[:remainder]].sum())


def test_the_plans_token_count_is_the_demos_own_before_any_training():
    job = resolve_job(load_spec(DEMO_SPEC))
    assert job.dataset.exact and "tiny-llama" in job.dataset.how
    assert (job.total_tokens, job.steps, job.blocks) == (536_886, 263, 210)


@pytest.mark.slow
def test_the_planned_token_count_equals_the_recipes_start_event_on_the_demo(tmp_path):
    """The recipe, run for real on the shipped demo until it reports its plan (its start event), then
    stopped: its total_tokens is the plan's, token for token."""
    planned = subprocess.run([sys.executable, "-m", "orchestrator.cli", "plan", str(DEMO_SPEC), "--json"],
                             capture_output=True, text=True, timeout=120, check=True)
    plan = json.loads(planned.stdout)
    events = tmp_path / "run" / "events.jsonl"
    recipe = subprocess.Popen([sys.executable, "-m", "recipes.sft", str(DEMO_SPEC), "--run-dir", str(tmp_path / "run")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def start_event():
            if recipe.poll() is not None:
                raise AssertionError(f"the recipe exited {recipe.returncode} before its start event")
            lines = events.read_text().splitlines() if events.exists() else []
            return next((json.loads(line) for line in lines if json.loads(line)["event"] == "start"), None)
        start = wait_until(start_event, timeout=300)
    finally:
        recipe.send_signal(signal.SIGTERM)
        recipe.wait(timeout=120)
    assert start["total_tokens"] == plan["total_tokens"] == 536_886
    assert start["total_steps"] == plan["assumptions"]["dataset"]["steps"]
