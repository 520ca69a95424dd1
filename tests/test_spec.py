"""The job spec: what validates, and the one-line error for what does not."""
import textwrap

import pytest

from contract.spec import SpecError, load_spec, parse_spec

GOOD = """
name: support-bot
model: meta-llama/Llama-3.1-8B
method: qlora
lora: {r: 16, alpha: 32, dropout: 0.05, target_modules: all-linear}
data:
  examples: 10000
  tokens_per_example: 512
seq_len: 2048
epochs: 3
batch: {micro: auto, global: 32}
checkpoint: {every_minutes: 15}
constraints:
  gpus: [H100, A100-80GB, L40S, A10G]
  providers: [aws, gcp, azure, lambda, runpod]
  spot: auto
  max_price_per_hour: 4.0
  budget: 50
  deadline_hours: 12
"""


def write(tmp_path, text, name="spec.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_the_issue_example_spec_validates(tmp_path):
    spec = load_spec(write(tmp_path, GOOD))
    assert spec.method == "qlora"
    assert spec.batch.global_ == 32 and spec.batch.micro == "auto"
    assert spec.constraints.providers == ["aws", "gcp", "azure", "lambda", "runpod"]
    assert spec.data_path() is None


def test_relative_data_path_resolves_against_the_spec_file(tmp_path):
    (tmp_path / "sub").mkdir()
    p = write(tmp_path / "sub", "name: a\nmodel: tiny-llama\nmethod: lora\ndata: {path: d/train.jsonl}\n")
    assert load_spec(p).data_path() == (tmp_path / "sub" / "d" / "train.jsonl").resolve()


def test_hash_is_stable_and_changes_with_content(tmp_path):
    a = load_spec(write(tmp_path, GOOD))
    b = load_spec(write(tmp_path, GOOD, "b.yaml"))
    c = load_spec(write(tmp_path, GOOD.replace("epochs: 3", "epochs: 2"), "c.yaml"))
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: [unclosed\nmodel: x\n", "malformed YAML at line"),
        ("name: a\n  model: b\n", "malformed YAML at line 2"),
        ("- just\n- a list\n", "YAML mapping"),
        (GOOD + "colour: blue\n", "unknown field 'colour'"),
        (GOOD.replace("method: qlora", "method: dora"), "field 'method'"),
        (GOOD.replace("  spot: auto", "  spot: sometimes"), "field 'constraints.spot'"),
        (GOOD.replace("  examples: 10000\n", ""), "data.path or both data.examples"),
        (GOOD.replace("name: support-bot", "name: Support Bot!"), "field 'name'"),
        ("model: x\nmethod: lora\ndata: {path: a.jsonl}\n", "missing field 'name'"),
        (GOOD.replace("seq_len: 2048", "seq_len: -1"), "field 'seq_len'"),
    ],
)
def test_bad_specs_give_one_line_naming_the_cause(tmp_path, text, message):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, text))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_spec_file_is_named(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_parse_spec_rejects_non_mapping():
    with pytest.raises(SpecError):
        parse_spec("just a string")
