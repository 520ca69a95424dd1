"""`spotune plan`: the table, --json, --explain, --diff, and one clean line for every bad input."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUPPORT_BOT = ROOT / "examples" / "llama8b-qlora.yaml"


def spotune(*args, cwd=ROOT):
    env = {**os.environ, "COLUMNS": "220", "SKY_RUNTIME_DIR": str(cwd)}   # no SkyPilot catalog overlay: bundled prices only
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SPEC = """name: t
model: meta-llama/Llama-3.1-8B
method: qlora
data:
  examples: 10000
  tokens_per_example: 512
epochs: 3
"""


def test_plan_prints_ranked_options_managed_apis_and_rejections():
    result = spotune("plan", SUPPORT_BOT, "--top", "5")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "15,360,000 tokens" in out
    for header in ("where", "GPU", "spot", "$/h", "tokens/s", "hours", "cost", "GB/GPU"):
        assert header in out
    assert "managed fine-tuning APIs" in out and "together" in out and "GPU cheaper above" in out
    assert "cheapest rejected" in out
    assert "data.examples x data.tokens_per_example" in out


def test_json_is_exactly_one_plan_object():
    result = spotune("plan", SUPPORT_BOT, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)          # the whole stdout is one JSON document
    assert plan["total_tokens"] == 15_360_000 and plan["method"] == "qlora"
    costs = [o["expected_cost"] for o in plan["options"]]
    assert costs == sorted(costs) and plan["options"][0]["rank"] == 1
    assert plan["managed"] and plan["assumptions"]["calibration"]["sources"]


def test_explain_prints_memory_breakdown_and_cost_lines_of_the_best_option():
    result = spotune("plan", SUPPORT_BOT, "--explain", "--top", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for item in ("weights", "optimizer states", "activations", "logits + loss", "runtime", "total"):
        assert item in out
    assert "training" in out and "tokens/s / 3600" in out and "expected total" in out


def test_diff_reports_the_change_in_cost_and_time(tmp_path):
    double = write(tmp_path / "six-epochs.yaml", SUPPORT_BOT.read_text().replace("epochs: 3", "epochs: 6"))
    result = spotune("plan", SUPPORT_BOT, "--diff", double, "--top", "1")
    assert result.returncode == 0, result.stderr
    line = next(l for l in result.stdout.splitlines() if l.strip().startswith("cost "))
    assert "+$" in line and "%" in line and "time +" in line


def test_a_dataset_path_spec_is_counted():
    result = spotune("plan", ROOT / "examples" / "qwen1.5b-lora-jsonl.yaml", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["assumptions"]["dataset"]["examples"] == 400


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0]


def test_malformed_yaml(tmp_path):
    bad = write(tmp_path / "bad.yaml", "name: t\nmodel: [unclosed\n")
    assert_one_line_error(spotune("plan", bad), "malformed YAML", "line")


def test_unknown_field(tmp_path):
    bad = write(tmp_path / "bad.yaml", SPEC + "colour: blue\n")
    assert_one_line_error(spotune("plan", bad), "unknown field 'colour'")


def test_unknown_model(tmp_path):
    bad = write(tmp_path / "bad.yaml", SPEC.replace("meta-llama/Llama-3.1-8B", "acme/Nope-9B"))
    assert_one_line_error(spotune("plan", bad), "unknown model 'acme/Nope-9B'")


def test_missing_dataset_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", SPEC.replace("  examples: 10000\n  tokens_per_example: 512\n", "  path: nowhere.jsonl\n"))
    assert_one_line_error(spotune("plan", bad), "dataset file not found", "nowhere.jsonl")


def test_dataset_that_is_not_jsonl(tmp_path):
    write(tmp_path / "data.csv", "instruction,output\nhi,there\n")
    bad = write(tmp_path / "bad.yaml", SPEC.replace("  examples: 10000\n  tokens_per_example: 512\n", "  path: data.csv\n"))
    assert_one_line_error(spotune("plan", bad), "data.csv:1: not valid JSON")


def test_nothing_can_satisfy_the_spec_names_the_closest_miss(tmp_path):
    bad = write(tmp_path / "bad.yaml", SPEC.replace("meta-llama/Llama-3.1-8B", "llama-3.1-405b").replace("qlora", "full"))
    assert_one_line_error(spotune("plan", bad), "GB across GPUs", "the largest allowed option has")


@pytest.mark.parametrize("constraint, fragment", [
    ("  deadline_hours: 0.01\n", "deadline"),
    ("  budget: 0.01\n", "budget"),
])
def test_an_impossible_deadline_or_budget_names_the_closest_miss(tmp_path, constraint, fragment):
    bad = write(tmp_path / "bad.yaml", SPEC + "constraints:\n" + constraint)
    assert_one_line_error(spotune("plan", bad), "closest miss", fragment)
