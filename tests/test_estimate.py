"""Memory, throughput, preemption and token-count models, held to the H100 anchors."""
import copy
import json
from pathlib import Path

import pytest
import yaml

from orchestrator.catalog import gpu_specs
from contract.errors import UserError
from orchestrator.estimate import (CALIBRATION_PATH, GIB, PREEMPTION_PATH, calibration_from_data, load_calibration)
from orchestrator.estimate.memory import choose_batch, estimate_memory
from orchestrator.estimate.preemption import checkpoint_interval_hours, preemption_overhead_hours
from orchestrator.estimate.throughput import estimate_throughput, flops_per_token
from orchestrator.estimate.tokens import count_dataset_tokens
from orchestrator.architectures import resolve_architecture

# Real H100 measurements (figures unchanged since measured; see docs/anchors/README.md): the calibration's evidence.
ANCHORS = json.loads((Path(__file__).resolve().parents[1] / "docs" / "anchors" / "h100-naive-baseline.json").read_text())
MODELS = {"llama-1b": "meta-llama/Llama-3.2-1B", "llama-8b": "meta-llama/Llama-3.1-8B"}


def _calibration(**recipe_changes):
    data = yaml.safe_load(CALIBRATION_PATH.read_text())
    data = copy.deepcopy(data)
    data["recipe"].update(recipe_changes)
    return calibration_from_data(data, yaml.safe_load(PREEMPTION_PATH.read_text()), gpu_specs())


NAIVE = _calibration(qlora_fp32_upcast=True)           # the anchors' loop: prepare_model_for_kbit_training
ONE_LEVER = _calibration(qlora_fp32_upcast=False)         # the anchors' one lever: no fp32 upcast


def _runs(section):
    return [pytest.param(r, id=f"{r['model']}-{r['method']}-mb{r['micro_batch']}-{'ckpt' if r['grad_ckpt'] else 'nockpt'}")
            for r in section]


def _memory(run, cal):
    return estimate_memory(resolve_architecture(MODELS[run["model"]]), run["method"], seq_len=run["seq"],
                           micro_batch=run["micro_batch"], gradient_checkpointing=run["grad_ckpt"], gpu_count=1,
                           cal=cal, lora_r=16, lora_dropout=0.0)


def _throughput(run, cal):
    return estimate_throughput(resolve_architecture(MODELS[run["model"]]), run["method"], seq_len=run["seq"],
                               gradient_checkpointing=run["grad_ckpt"], device=cal.device("H100"), gpu_count=1, cal=cal)


@pytest.mark.parametrize("run", _runs(ANCHORS["runs"]))
def test_memory_model_reproduces_each_anchor_peak_within_15_percent(run):
    predicted = _memory(run, NAIVE).peak_allocated / GIB
    assert predicted == pytest.approx(run["peak_gib"], rel=0.15)


@pytest.mark.parametrize("run", _runs(ANCHORS["one_lever"]["runs"]))
def test_memory_model_without_fp32_upcast_reproduces_the_one_lever_runs(run):
    assert _memory(run, ONE_LEVER).peak_allocated / GIB == pytest.approx(run["peak_gib"], rel=0.15)


def test_the_anchor_run_that_ran_out_of_memory_does_not_fit_an_h100():
    failed = ANCHORS["failed"][0]
    run = {**failed, "grad_ckpt": failed["grad_ckpt"]}
    assert _memory(run, NAIVE).total_gib > 80


@pytest.mark.parametrize("run", _runs(ANCHORS["runs"]))
def test_throughput_model_reproduces_each_anchor_within_15_percent(run):
    assert _throughput(run, NAIVE).tokens_per_second == pytest.approx(run["tokens_per_second"], rel=0.15)


@pytest.mark.parametrize("run", _runs(ANCHORS["one_lever"]["runs"]))
def test_qlora_without_fp32_upcast_runs_at_the_one_lever_speed(run):
    assert _throughput(run, ONE_LEVER).tokens_per_second == pytest.approx(run["tokens_per_second"], rel=0.15)


def test_measured_ordering_is_kept_lora_slower_than_full_at_1b_and_qlora_slowest():
    arch = resolve_architecture("llama-3.2-1b")
    speed = {m: estimate_throughput(arch, m, seq_len=2048, gradient_checkpointing=False, device=NAIVE.device("H100"),
                                    gpu_count=1, cal=NAIVE).tokens_per_second for m in ("full", "lora", "qlora")}
    assert speed["full"] > speed["lora"] > 2.3 * speed["qlora"]


def test_flops_per_token_uses_the_anchor_accounting():
    arch = resolve_architecture("llama-3.1-8b")
    attention = 6 * 32 * 4096 * 2048
    assert flops_per_token(arch, "full", 2048, False) == 6 * arch.params + attention
    assert flops_per_token(arch, "lora", 2048, False) == 4 * arch.params + attention
    assert flops_per_token(arch, "qlora", 2048, True) == 6 * arch.params + attention


def test_other_gpus_scale_by_peak_tflops():
    cal = load_calibration()
    arch = resolve_architecture("llama-3.1-8b")
    h100, a100 = (estimate_throughput(arch, "lora", seq_len=2048, gradient_checkpointing=True, device=cal.device(g),
                                      gpu_count=1, cal=cal).tokens_per_second for g in ("H100", "A100-80GB"))
    assert a100 / h100 == pytest.approx(gpu_specs()["A100-80GB"].bf16_tflops / gpu_specs()["H100"].bf16_tflops)


def test_full_fine_tuning_shards_model_states_over_the_instance_gpus():
    cal = load_calibration()
    arch = resolve_architecture("llama-3.1-8b")
    one, eight = (estimate_memory(arch, "full", seq_len=2048, micro_batch=1, gradient_checkpointing=True, gpu_count=n,
                                  cal=cal) for n in (1, 8))
    assert one.weights + one.gradients + one.optimizer == pytest.approx(8 * arch.params)
    assert eight.weights + eight.gradients + eight.optimizer == pytest.approx(arch.params)
    assert eight.activations == one.activations


def test_batch_choice_prefers_no_checkpointing_and_the_largest_power_of_two_that_fits():
    cal = load_calibration()
    arch = resolve_architecture("llama-3.1-8b")
    choice, _ = choose_batch(arch, "lora", seq_len=2048, global_batch=32, micro=None, checkpointing=None,
                             gpu_count=1, vram_gb=80, cal=cal)
    assert (choice.micro_batch, choice.gradient_checkpointing) == (2, False)   # the anchors ran exactly this
    assert choice.memory.total_gib <= 80
    bigger = estimate_memory(arch, "lora", seq_len=2048, micro_batch=4, gradient_checkpointing=False, gpu_count=1, cal=cal)
    assert bigger.total_gib > 80
    small, _ = choose_batch(arch, "lora", seq_len=2048, global_batch=32, micro=None, checkpointing=None,
                            gpu_count=1, vram_gb=24, cal=cal)
    assert small.gradient_checkpointing   # 16 GB of bf16 weights leave too little for activations without it


def test_batch_choice_respects_fixed_micro_and_checkpointing_and_reports_a_miss():
    cal = load_calibration()
    arch = resolve_architecture("llama-3.1-70b")
    choice, smallest = choose_batch(arch, "full", seq_len=2048, global_batch=32, micro=4, checkpointing=True,
                                    gpu_count=1, vram_gb=80, cal=cal)
    assert choice is None and smallest.micro_batch == 4 and smallest.gradient_checkpointing


def test_preemption_overhead_is_rate_times_hours_times_half_interval_plus_restart():
    cal = load_calibration()
    overhead = preemption_overhead_hours("aws", run_hours=10, interval_hours=0.25, cal=cal)
    aws = cal.preemption("aws")
    assert overhead.hours == pytest.approx(aws.rate_per_hour * 10 * (0.25 / 2 + aws.restart_minutes / 60))
    assert overhead.rate_per_hour == aws.rate_per_hour
    unknown = preemption_overhead_hours("somecloud", 10, 0.25, cal).hours
    default = cal.preemption_default
    assert unknown == pytest.approx(default.rate_per_hour * 10 * (0.125 + default.restart_minutes / 60))


def test_checkpoint_interval_is_the_sooner_trigger():
    assert checkpoint_interval_hours(15, None, step_seconds=10, run_hours=5) == 0.25
    assert checkpoint_interval_hours(15, 30, step_seconds=10, run_hours=5) == pytest.approx(300 / 3600)
    assert checkpoint_interval_hours(None, None, step_seconds=10, run_hours=5) == 5


def test_jsonl_tokens_are_estimated_at_four_characters_without_a_tokenizer(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "' + "a" * 400 + '"}\n\n{"text": "' + "b" * 199 + '"}\n')
    counted = count_dataset_tokens(path)
    assert (counted.examples, counted.tokens, counted.exact) == (2, (100 + 1) + (50 + 1), False)  # + an eos each
    assert "4 characters per token" in counted.how


def test_jsonl_tokens_are_counted_with_the_models_tokenizer_and_chat_template(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from contract.tokenizer import FileTokenizer

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2, "</s>": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    path = tmp_path / "d.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello"}]}\n')
    counted = count_dataset_tokens(path, FileTokenizer(tok, {"eos_token": "</s>"}, None, "tokenizer.json here"))
    # The plain '### Role:' rendering (no chat template): ### User: hello world ### Assistant: hello </s>,
    # where '###', 'User' and the colons are unknown words.
    assert counted.exact and counted.tokens == len(tok.encode("### User:\nhello world\n\n### Assistant:\nhello</s>").ids)
    assert "tokenizer.json here" in counted.how


def test_bad_jsonl_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\nnot json at all\n')
    with pytest.raises(UserError, match=r"d\.jsonl:2: not valid JSON"):
        count_dataset_tokens(path)
    assert count_dataset_tokens(path, on_bad_line="skip").examples == 1


def test_a_json_array_file_is_not_jsonl(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[{"text": "a"},\n {"text": "b"}]\n')
    with pytest.raises(UserError, match=r"d\.json:1: not valid JSON"):
        count_dataset_tokens(path)


def test_missing_dataset_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        count_dataset_tokens(tmp_path / "nope.jsonl")


def test_every_calibration_figure_has_a_source():
    data = yaml.safe_load(CALIBRATION_PATH.read_text())
    for method, points in data["throughput"]["mfu"].items():
        assert all(p.get("source") for p in points), method
    for section in ("qlora_fp32_upcast", "qlora_dequantization"):
        assert data["throughput"][section].get("source"), section
    for section in ("recipe", "runtime", "overheads"):
        assert data[section].get("source"), section
    assert all(d.get("source") for d in data["devices"].values())
    preemption = yaml.safe_load(PREEMPTION_PATH.read_text())
    assert preemption["default"]["source"] and all(p["source"] for p in preemption["providers"].values())


def test_a_tiny_model_is_capped_by_the_micro_step_floor_and_the_anchors_are_not():
    cal = load_calibration()
    tiny = resolve_architecture("tiny-llama")
    capped = estimate_throughput(tiny, "lora", seq_len=256, gradient_checkpointing=False, device=cal.device("H100"),
                                 gpu_count=1, cal=cal, micro_batch=8)
    floor = cal.micro_step_floor.seconds + cal.micro_step_floor.seconds_per_layer * tiny.layers
    assert capped.floor_seconds == floor and capped.tokens_per_second == pytest.approx(8 * 256 / floor)
    for run in ANCHORS["runs"]:
        est = estimate_throughput(resolve_architecture(MODELS[run["model"]]), run["method"], seq_len=run["seq"],
                                  gradient_checkpointing=run["grad_ckpt"], device=cal.device("H100"), gpu_count=1,
                                  cal=NAIVE, micro_batch=run["micro_batch"])
        assert est.floor_seconds == 0.0
