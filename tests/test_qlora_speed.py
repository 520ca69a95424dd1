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


def naive_calibration():
    """The anchors' naive loop: prepare_model_for_kbit_training's fp32 upcast."""
    data = copy.deepcopy(yaml.safe_load(CALIBRATION_PATH.read_text()))
    data["recipe"]["qlora_fp32_upcast"] = True
    return calibration_from_data(data, yaml.safe_load(PREEMPTION_PATH.read_text()), gpu_specs())


NAIVE_QLORA = {r["model"]: r for r in ANCHORS["runs"] if r["method"] == "qlora"}


def test_with_the_fp32_upcast_attention_and_the_head_run_at_the_fp32_rate_and_dequantization_stays():
    naive = naive_calibration()
    h100 = naive.device("H100")
    run = NAIVE_QLORA["llama-8b"]
    estimate = estimate_throughput(LLAMA_8B, "qlora", seq_len=run["seq"], gradient_checkpointing=run["grad_ckpt"],
                                   device=h100, gpu_count=1, cal=naive, micro_batch=run["micro_batch"])
    assert estimate.fp32_flops_per_token == (6 * LLAMA_8B.layers * LLAMA_8B.hidden * run["seq"]
                                             + 4 * LLAMA_8B.hidden * LLAMA_8B.vocab)
    u = naive.qlora_upcast
    assert estimate.fp32_tflops_per_gpu == pytest.approx(989 * u.fp32_peak_per_bf16_peak * u.fp32_mfu)
    # bitsandbytes dequantizes to its compute dtype whatever the input's: the same term as without the upcast
    assert estimate.dequantization_seconds == dequantization_seconds(LLAMA_8B, "qlora", True, H100, CAL) > 0
    # the run fp32_mfu was fitted on
    assert estimate.tokens_per_second == pytest.approx(run["tokens_per_second"], rel=0.01)
    assert "in fp32 (attention, head)" in estimate.formula()


def test_the_upcast_mechanism_fitted_at_8b_predicts_the_held_out_1b_anchor():
    naive = naive_calibration()
    run = NAIVE_QLORA["llama-1b"]
    predicted = estimate_throughput(resolve_architecture("meta-llama/Llama-3.2-1B"), "qlora", seq_len=run["seq"],
                                    gradient_checkpointing=run["grad_ckpt"], device=naive.device("H100"), gpu_count=1,
                                    cal=naive, micro_batch=run["micro_batch"]).tokens_per_second
    assert predicted == pytest.approx(run["tokens_per_second"], rel=0.05)


def test_the_upcast_costs_most_where_attention_and_the_head_are_the_largest_share():
    """fp32 attention grows with seq_len and the fp32 head is a fixed 4 x hidden x vocab per token:
    at short sequences the head dominates, at long ones attention does; either way a larger share
    of the step leaves the bf16 tensor cores than one factor per model size could say."""
    naive = naive_calibration()

    def slowdown(seq_len):
        return speed("qlora", 4, seq_len) / speed("qlora", 4, seq_len, cal=naive, device=naive.device("H100"))

    assert slowdown(8192) > slowdown(2048) > 1.5
    # on a GPU that trains in fp32 anyway (no bf16), the upcast changes nothing
    v100 = naive.device("V100")
    assert speed("qlora", 4, device=v100, cal=naive) == pytest.approx(speed("qlora", 4, device=CAL.device("V100")))
