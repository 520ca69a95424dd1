"""One decision, made once: each plan option carries the execution config its price describes, a
launch hands the chosen one to the node, the recipe follows it (or logs a deviation), and the
ledger keeps planned against actual."""
from __future__ import annotations

import json
from decimal import Decimal

import pytest
from typer.testing import CliRunner

from contract.backend import ObservedAttempt
from contract.events import DEVIATION, EventLog
from contract.execution import ExecutionConfig
from contract.spec import SpecError, parse_spec
from orchestrator import jobs
from orchestrator.catalog import gpu_specs
from orchestrator.estimate import DeviceSpec, load_calibration
from orchestrator.estimate.memory import estimate_memory
from orchestrator.estimate.throughput import estimate_throughput
from orchestrator.architectures import resolve_architecture
from orchestrator.execution import PinnedExecutionError
from orchestrator.ledger import Ledger
from orchestrator.planner import make_plan, plan_local
from orchestrator.quote import Offer
from orchestrator.report import build_entries, to_json_text, totals
from recipes.execution import DeviceFacts, follow_plan, same_gpu

QLORA_8B = {"name": "bot", "model": "meta-llama/Llama-3.1-8B", "method": "qlora",
            "data": {"examples": 10_000, "tokens_per_example": 512}, "seq_len": 2048}
H100_PLAN = {"gpu": "H100", "gpu_count": 1, "micro_batch": 4, "grad_accum": 8, "gradient_checkpointing": False,
             "dtype": "bfloat16", "sharding": "none", "needs_free_gib": 60.0, "activations_gib": 40.0}


def spec(**changes):
    return parse_spec({**QLORA_8B, **changes})


def offer(provider, gpu, vram, price, count=1):
    return Offer(provider=provider, region="r1", instance_type=f"{gpu}-{count}", gpu=gpu, gpu_count=count,
                 vram_gb_per_gpu=vram, price_on_demand=Decimal(price), price_spot=None)


OFFERS = [offer("a", "H100", 80, "4.00"), offer("b", "L4", 24, "0.80"), offer("c", "T4", 16, "0.35"),
          offer("d", "A10G", 24, "1.00", count=4)]


# ---- the plan ---------------------------------------------------------------------------------

def test_every_option_carries_the_execution_config_its_price_describes():
    cal = load_calibration()
    plan = make_plan(spec(), OFFERS, ())
    for option in plan.options:
        ex = option.execution
        assert (ex.gpu, ex.gpu_count) == (option.offer.gpu, option.offer.gpu_count)
        assert (ex.micro_batch, ex.grad_accum, ex.gradient_checkpointing) == (
            option.micro_batch, option.grad_accum, option.gradient_checkpointing)
        assert ex.grad_accum == -(-32 // (ex.micro_batch * ex.gpu_count))
        assert ex.attention == "sdpa"
        # What must be free once the process holds its CUDA context: the estimate less that context.
        assert ex.needs_free_gib == pytest.approx(option.memory_gb_per_gpu - cal.runtime.cuda_context_gib, abs=1e-3)
        assert 0 < ex.activations_gib < ex.needs_free_gib
    by_gpu = {o.offer.gpu: o.execution for o in plan.options}
    assert by_gpu["H100"].dtype == "bfloat16" and by_gpu["T4"].dtype == "float32"
    assert by_gpu["A10G"].sharding == "ddp" and by_gpu["H100"].sharding == "none"


def test_plan_json_shows_each_options_execution(tmp_path):
    from orchestrator.cli import app

    path = tmp_path / "spec.yaml"
    path.write_text(json.dumps(QLORA_8B))
    result = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code == 0, result.output
    for option in json.loads(result.stdout)["options"]:
        ex = option["execution"]
        assert set(ex) >= {"gpu", "gpu_count", "micro_batch", "grad_accum", "gradient_checkpointing", "attention",
                           "dtype", "sharding"}
        assert (ex["micro_batch"], ex["gradient_checkpointing"], ex["gpu"]) == (
            option["micro_batch"], option["gradient_checkpointing"], option["gpu"])


def test_gpus_without_bf16_are_priced_at_the_fp32_rate_the_recipe_runs():
    cal, arch = load_calibration(), resolve_architecture("meta-llama/Llama-3.1-8B")
    t4 = cal.device("T4")
    assert (t4.dtype, t4.peak_tflops) == ("float32", gpu_specs()["T4"].fp32_tflops)
    as_if_fp16 = DeviceSpec("T4", gpu_specs()["T4"].bf16_tflops, 16)   # what the planner priced before
    args = dict(seq_len=2048, gradient_checkpointing=True, gpu_count=1, cal=cal)
    priced = estimate_throughput(arch, "qlora", device=t4, **args).tokens_per_second
    tensor_core = estimate_throughput(arch, "qlora", device=as_if_fp16, **args).tokens_per_second
    assert priced / tensor_core == pytest.approx(8.1 / 65)
    # ... and at fp32 memory: every 2-byte figure takes 4.
    bf16, fp32 = (estimate_memory(arch, "lora", seq_len=2048, micro_batch=1, gradient_checkpointing=True, gpu_count=1,
                                  cal=cal, dtype=d) for d in ("bfloat16", "float32"))
    assert fp32.weights == pytest.approx(2 * bf16.weights, rel=0.01)
    assert fp32.activations > 1.9 * bf16.activations
    t4_option = next(o for o in make_plan(spec(), OFFERS, ()).options if o.offer.gpu == "T4")
    # The plan prices the micro-batch it runs, so QLoRA's dequantization per micro-step is in its figure too.
    ran = dict(args, gradient_checkpointing=t4_option.gradient_checkpointing, micro_batch=t4_option.micro_batch)
    assert t4_option.tokens_per_second == pytest.approx(estimate_throughput(arch, "qlora", device=t4, **ran).tokens_per_second)
    assert t4_option.execution.dtype == "float32"


def test_lora_on_several_gpus_keeps_the_whole_base_on_each_as_ddp_does():
    cal, arch = load_calibration(), resolve_architecture("llama-3.1-8b")
    one, four = (estimate_memory(arch, "lora", seq_len=2048, micro_batch=1, gradient_checkpointing=True, gpu_count=n,
                                 cal=cal) for n in (1, 4))
    assert four.weights == one.weights and four.sharding == "ddp"
    assert four.fsdp_buffers == pytest.approx(one.gradients)        # DDP's bucket copy of the adapter gradients
    full = estimate_memory(arch, "full", seq_len=2048, micro_batch=1, gradient_checkpointing=True, gpu_count=4, cal=cal)
    assert full.sharding == "fsdp"


def test_a_spec_may_pin_its_execution_and_the_plan_prices_exactly_that():
    pinned = {"gpu": "L4", "gpu_count": 1, "micro_batch": 1, "grad_accum": 32, "gradient_checkpointing": True,
              "dtype": "bfloat16", "sharding": "none"}
    plan = make_plan(spec(execution=pinned), OFFERS, ())
    assert [o.offer.gpu for o in plan.options] == ["L4"]
    assert plan.best.execution.model_dump(exclude={"needs_free_gib", "activations_gib"}) == {**pinned, "attention": "sdpa", "num_nodes": 1}
    with pytest.raises(PinnedExecutionError, match="execution.dtype: T4 trains in float32"):
        make_plan(spec(execution={**pinned, "gpu": "T4"}), OFFERS, ())
    with pytest.raises(PinnedExecutionError, match="execution.gpu: unknown GPU 'L5'"):
        make_plan(spec(execution={**pinned, "gpu": "L5"}), OFFERS, ())
    with pytest.raises(PinnedExecutionError, match="execution pins 1xL4; this machine has 1xCPU"):
        plan_local(spec(execution=pinned), "CPU", 1, 0)


@pytest.mark.parametrize("change, message", [
    ({"grad_accum": 3}, "execution.grad_accum must be 8: batch.global 32 over micro-batch 4 x 1 GPU(s)"),
    ({"gpu_count": 2, "grad_accum": 4, "sharding": "fsdp"}, "execution.sharding must be 'ddp' for method qlora on 2 GPU(s)"),
    ({"gpu_count": 2, "grad_accum": 4}, "field 'execution': sharding 'none' cannot train on 2 GPUs (ddp or fsdp)"),
    ({"dtype": "float16"}, "field 'execution.dtype': Input should be 'bfloat16' or 'float32'"),
    ({"batch_size": 4}, "unknown field 'execution.batch_size'"),
])
def test_an_execution_section_that_does_not_fit_the_spec_is_one_line(change, message):
    with pytest.raises(SpecError) as e:
        spec(execution={**H100_PLAN, **change})
    assert str(e.value) == message


def test_a_pinned_micro_batch_must_agree_with_batch_micro():
    with pytest.raises(SpecError, match="^execution.micro_batch 4 differs from batch.micro 2$"):
        spec(batch={"micro": 2, "global": 32}, execution=H100_PLAN)


def test_the_launch_hands_the_chosen_options_config_to_the_node(tmp_path):
    job_spec = spec()
    plan = make_plan(job_spec, OFFERS, ())
    chosen = plan.options[1]
    request = jobs.launch_request("bot-1", job_spec, plan, chosen, tmp_path)
    assert request.node_spec["execution"] == chosen.execution.to_json()
    node = parse_spec(request.node_spec)
    assert node.execution == chosen.execution
    assert "execution" not in job_spec.node_spec()       # a spec without one gains nothing by itself


# ---- the node ---------------------------------------------------------------------------------

H100_NODE = DeviceFacts("cuda", "NVIDIA H100 80GB HBM3", 1, bf16=True, flash_attention=False, free_gib=79.0)


def test_the_recipe_runs_the_plan_unchanged_where_the_device_can():
    planned = ExecutionConfig(**H100_PLAN)
    running, deviations = follow_plan(planned, "qlora", 32, H100_NODE)
    assert deviations == []
    assert running.ran() == planned.ran()


def test_less_free_memory_than_planned_shrinks_the_micro_batch_by_the_plans_own_figures():
    planned = ExecutionConfig(**H100_PLAN)           # 20 GiB fixed + 40 GiB of activations at micro-batch 4
    running, deviations = follow_plan(planned, "qlora", 32, DeviceFacts("cuda", "NVIDIA H100", 1, True, False, 45.0))
    assert (running.micro_batch, running.grad_accum, running.gradient_checkpointing) == (2, 16, False)
    [d] = deviations
    assert (d.kind, d.planned, d.running) == ("memory", {"micro_batch": 4, "gradient_checkpointing": False},
                                              {"micro_batch": 2, "gradient_checkpointing": False})
    assert "60.0 GiB free per GPU at micro-batch 4; 45.0 GiB is free here" in d.reason
    running, [d] = follow_plan(planned, "qlora", 32, DeviceFacts("cuda", "NVIDIA H100", 1, True, False, 25.0))
    assert (running.micro_batch, running.gradient_checkpointing) == (1, True) and "checkpointing" in d.reason


def test_each_way_the_node_differs_is_one_deviation():
    planned = ExecutionConfig(**{**H100_PLAN, "attention": "flash_attention_2"})
    running, deviations = follow_plan(planned, "qlora", 32, DeviceFacts("cuda", "Tesla V100-SXM2-16GB", 2, False, False,
                                                                         200.0))
    assert [d.kind for d in deviations] == ["gpu", "gpu_count", "dtype", "attention"]
    assert (running.gpu, running.gpu_count, running.dtype, running.attention, running.sharding, running.grad_accum) == (
        "Tesla V100-SXM2-16GB", 2, "float32", "sdpa", "ddp", 4)
    # The plan's memory figures were bf16: in float32 they double (120 GiB fits 200 GiB free).
    assert running.micro_batch == 4
    running, deviations = follow_plan(ExecutionConfig(**H100_PLAN), "qlora", 32, DeviceFacts("cpu", None, 1, False, False))
    assert [d.kind for d in deviations] == ["device", "dtype"] and running.gpu == "CPU"


@pytest.mark.parametrize("planned, reported, same", [
    ("H100", "NVIDIA H100 80GB HBM3", True), ("A100-80GB", "NVIDIA A100-SXM4-80GB", True),
    ("RTX6000-Ada", "NVIDIA RTX 6000 Ada Generation", True), ("L40S", "NVIDIA L40S", True),
    ("A10", "NVIDIA A100-SXM4-40GB", False), ("A10G", "NVIDIA A10G", True), ("H100", "NVIDIA L40S", False),
    ("T4", "Tesla T4", True), ("T4", None, False),
])
def test_a_gpu_is_the_planned_one_by_its_model_name(planned, reported, same):
    assert same_gpu(planned, reported) is same


# ---- the ledger ---------------------------------------------------------------------------------

def test_the_ledger_keeps_planned_against_actual_and_the_report_shows_both(tmp_path, ledger_url):
    from datetime import datetime, timezone

    job_spec = spec(name="pva")
    plan = make_plan(job_spec, OFFERS, ())
    chosen = plan.best
    ledger = Ledger(ledger_url)
    job_id = ledger.create_job(job_spec, json.dumps(QLORA_8B), "skypilot", plan, chosen.rank)
    events = EventLog(tmp_path / "events.jsonl", attempt=1)
    events.emit(DEVIATION, kind="memory", reason="less free memory", planned={"micro_batch": chosen.micro_batch},
                running={"micro_batch": 1})
    events.emit("start", resumed_from_step=None, device="cuda", gpu_name="NVIDIA H100", gpu_count=1, total_steps=10,
                total_tokens=1000, micro_batch=1, grad_accum=32, gradient_checkpointing=True, attention="sdpa",
                dtype="bfloat16", sharding="none", decided_by="plan")
    events = EventLog(tmp_path / "events.jsonl", attempt=2)
    events.emit("start", resumed_from_step=None, device="cuda", micro_batch="4", gradient_checkpointing="yes")
    events.close()
    started = datetime(2026, 12, 1, tzinfo=timezone.utc)
    for n in (1, 2):
        ledger.upsert_attempt(job_id, ObservedAttempt(n=n, placement=chosen.placement, started_at=started))
    ledger.ingest_events(job_id, tmp_path / "events.jsonl")

    estimate = ledger.get_job(job_id).estimate
    assert (estimate.micro_batch, estimate.grad_accum, estimate.gradient_checkpointing, estimate.attention,
            estimate.dtype) == (chosen.micro_batch, chosen.grad_accum, chosen.gradient_checkpointing, "sdpa", "bfloat16")
    first, second = ledger.attempts(job_id)
    assert (first.micro_batch, first.grad_accum, first.gradient_checkpointing, first.dtype) == (1, 32, True, "bfloat16")
    assert (second.micro_batch, second.gradient_checkpointing) == (None, None)   # wrong types are not stored

    entries = build_entries(ledger, [ledger.get_job(job_id)], started)
    report = json.loads(to_json_text(entries, totals(entries)))["jobs"][0]
    assert (report["estimate"]["micro_batch"], report["estimate"]["gradient_checkpointing"]) == (
        chosen.micro_batch, chosen.gradient_checkpointing)
    assert [(a["micro_batch"], a["gradient_checkpointing"]) for a in report["attempts"]] == [(1, True), (None, None)]
    assert [d["kind"] for d in report["attempts"][0]["deviations"]] == ["memory"]
    ledger.close()


def test_a_local_plan_prices_the_cpu_in_float32_without_memory_to_check():
    plan = plan_local(parse_spec({**QLORA_8B, "model": "tiny-llama", "method": "lora", "seq_len": 256,
                                  "batch": {"global": 16}}), "CPU", 1, 0)
    ex = plan.best.execution
    assert (ex.gpu, ex.dtype, ex.micro_batch, ex.gradient_checkpointing, ex.sharding) == ("CPU", "float32", 16, False, "none")
