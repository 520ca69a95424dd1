"""QLoRA speed from its mechanism: LoRA's bf16 compute plus one NF4 -> bf16 dequantization of every
linear weight per pass per micro-step, bytes over memory bandwidth; checked on the H100 anchors."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from orchestrator.architectures import resolve_architecture
from orchestrator.catalog import gpu_specs
from orchestrator.estimate import CALIBRATION_PATH, PREEMPTION_PATH, calibration_from_data, load_calibration
from orchestrator.estimate.throughput import dequantization_seconds, estimate_throughput

ANCHORS = json.loads((Path(__file__).resolve().parents[1] / "docs" / "anchors" / "h100-naive-baseline.json").read_text())
LLAMA_8B = resolve_architecture("meta-llama/Llama-3.1-8B")
CAL = load_calibration()
H100 = CAL.device("H100")


def speed(method, micro_batch, seq_len=2048, checkpointing=True, device=H100, cal=CAL):
    return estimate_throughput(LLAMA_8B, method, seq_len=seq_len, gradient_checkpointing=checkpointing, device=device,
                               gpu_count=1, cal=cal, micro_batch=micro_batch).tokens_per_second


@pytest.mark.parametrize("run", ANCHORS["one_lever"]["runs"], ids=lambda r: f"mb{r['micro_batch']}")
def test_the_mechanism_predicts_the_anchor_qlora_runs_at_their_micro_batch(run):
    assert run["model"] == "llama-8b" and not CAL.recipe.qlora_fp32_upcast
    predicted = speed("qlora", run["micro_batch"], run["seq"], run["grad_ckpt"])
    assert predicted == pytest.approx(run["tokens_per_second"], rel=0.10)


def test_dequantization_is_bytes_over_bandwidth_once_per_pass():
    d = CAL.qlora_dequantization
    one_pass = d.bytes_per_param * LLAMA_8B.linear_params / (H100.memory_bandwidth_gbs * 1e9 * d.bandwidth_efficiency)
    assert dequantization_seconds(LLAMA_8B, "qlora", False, H100, CAL) == pytest.approx(2 * one_pass)
    assert dequantization_seconds(LLAMA_8B, "qlora", True, H100, CAL) == pytest.approx(3 * one_pass)  # + recompute
    assert dequantization_seconds(LLAMA_8B, "lora", True, H100, CAL) == 0.0


def test_qlora_costs_more_over_lora_the_fewer_tokens_a_micro_step_carries():
    """One dequantization per micro-step, whatever its tokens: short sequences and small
    micro-batches pay it over fewer tokens (what one factor per model size could not say)."""
    def overhead(micro_batch, seq_len):
        return speed("lora", micro_batch, seq_len) / speed("qlora", micro_batch, seq_len) - 1

    assert overhead(1, 512) > overhead(1, 2048) > overhead(8, 2048) > 0
    assert overhead(1, 512) > 0.2 and overhead(8, 2048) < 0.01


def test_a_gpu_with_less_bandwidth_pays_more_for_dequantization():
    l4 = CAL.device("L4")
    assert l4.memory_bandwidth_gbs < H100.memory_bandwidth_gbs
    assert (dequantization_seconds(LLAMA_8B, "qlora", True, l4, CAL) / dequantization_seconds(LLAMA_8B, "qlora", True, H100, CAL)
            == pytest.approx(H100.memory_bandwidth_gbs / l4.memory_bandwidth_gbs))


def test_with_the_fp32_upcast_the_measured_slowdown_applies_and_no_dequantization_term():
    data = copy.deepcopy(yaml.safe_load(CALIBRATION_PATH.read_text()))
    data["recipe"]["qlora_fp32_upcast"] = True
    naive = calibration_from_data(data, yaml.safe_load(PREEMPTION_PATH.read_text()), gpu_specs())
    assert dequantization_seconds(LLAMA_8B, "qlora", True, naive.device("H100"), naive) == 0.0
    (run,) = [r for r in ANCHORS["runs"] if r["model"] == "llama-8b" and r["method"] == "qlora"]
    assert speed("qlora", run["micro_batch"], cal=naive, device=naive.device("H100")) == pytest.approx(
        run["tokens_per_second"], rel=0.15)
