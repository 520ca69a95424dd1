"""The training recipe for real: `python -m recipes.sft` subprocesses on the tiny model, on CPU.

The key property: a run stopped by SIGTERM (or SIGKILL, or with its newest checkpoint
corrupted) and resumed logs the same loss at every later step as an uninterrupted run and ends
with the same weights.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from contract.events import read_jsonl as read_events  # noqa: E402

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "recipes" / "configs" / "tiny-demo.yaml"
STEPS = 8


def write_spec(directory: Path, *, method="lora", max_steps=STEPS, every_steps=2, **changes) -> Path:
    """tiny-demo.yaml with a short run: the CPU is shared, so a handful of steps."""
    spec = yaml.safe_load(DEMO.read_text())
    spec["data"]["path"] = str((DEMO.parent / spec["data"]["path"]).resolve())
    spec["method"] = method
    spec["train"]["max_steps"] = max_steps
    spec["checkpoint"] = {"every_steps": every_steps, "every_minutes": None, "keep": 2}
    spec["lora"]["dropout"] = 0.1  # dropout draws from the RNG, so resume must restore it exactly
    for dotted, value in changes.items():
        section, _, key = dotted.partition("__")
        if key:
            spec[section][key] = value
        else:
            spec[section] = value
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def recipe_command(spec: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "recipes.sft", str(spec), "--run-dir", str(run_dir), *extra]


def run_recipe(spec: Path, run_dir: Path, *extra: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(recipe_command(spec, run_dir, *extra), cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


def run_until_step(spec: Path, run_dir: Path, step: int, sig: int, *extra: str) -> int:
    """Start the recipe, send `sig` once events.jsonl shows `step`, return its exit code."""
    process = subprocess.Popen(recipe_command(spec, run_dir, *extra), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not any(e["event"] == "step" and e["step"] >= step for e in read_events(run_dir / "events.jsonl")):
        assert process.poll() is None, "the recipe exited before the step to interrupt"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    process.send_signal(sig)
    return process.wait(timeout=300)


def losses(run_dir: Path, attempt=None) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_events(run_dir / "events.jsonl")
            if e["event"] == "step" and (attempt is None or e["attempt"] == attempt)}


def events_of(run_dir: Path, name: str) -> list[dict]:
    return [e for e in read_events(run_dir / "events.jsonl") if e["event"] == name]


def assert_same_losses(resumed: dict[int, float], reference: dict[int, float]) -> None:
    assert resumed, "the resumed run logged no steps"
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], rel=1e-5), f"step {step}"


def assert_same_adapter(run_dir: Path, reference_dir: Path) -> None:
    got = load_file(run_dir / "output" / "adapter_model.safetensors")
    want = load_file(reference_dir / "output" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("uninterrupted")
    spec = write_spec(base)
    run_dir = base / "run"
    result = run_recipe(spec, run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_uninterrupted_run_reports_every_step_and_writes_the_adapter(uninterrupted):
    start, = events_of(uninterrupted, "start")
    assert start["resumed_from_step"] is None and start["total_steps"] == STEPS and start["device"] == "cpu"
    steps = events_of(uninterrupted, "step")
    assert [e["step"] for e in steps] == list(range(1, STEPS + 1))
    assert all(e["attempt"] == 1 and e["tokens_per_second"] > 0 for e in steps)
    assert [e["tokens"] for e in steps] == sorted({e["tokens"] for e in steps})
    assert steps[-1]["tokens"] == start["total_tokens"]
    finished, = events_of(uninterrupted, "finished")
    assert finished["step"] == STEPS and finished["output_path"] == str(uninterrupted / "output")
    assert (uninterrupted / "output" / "adapter_config.json").exists()
    assert (uninterrupted / "output" / "tokenizer.json").exists()
    assert [p.name for p in sorted((uninterrupted / "checkpoints").iterdir())] == ["step-00000004", "step-00000006"]


def test_sigterm_then_resume_matches_uninterrupted_run(tmp_path, uninterrupted):
    spec, run_dir = write_spec(tmp_path), tmp_path / "run"
    assert run_until_step(spec, run_dir, 3, signal.SIGTERM) == 75
    preempted, = events_of(run_dir, "preempted")
    assert preempted["signal"] == "SIGTERM"
    stopped_at = preempted["step"]
    assert 3 <= stopped_at < STEPS
    assert events_of(run_dir, "checkpoint")[-1]["step"] == stopped_at

    env = dict(os.environ, SPOTUNE_ATTEMPT="2")
    result = run_recipe(spec, run_dir, env=env)
    assert result.returncode == 0, result.stderr
    start = events_of(run_dir, "start")[-1]
    assert start["attempt"] == 2 and start["resumed_from_step"] == stopped_at
    resumed = losses(run_dir, attempt=2)
    assert sorted(resumed) == list(range(stopped_at + 1, STEPS + 1))
    assert_same_losses(resumed, losses(uninterrupted))
    assert_same_losses(losses(run_dir, attempt=1), losses(uninterrupted))
    assert_same_adapter(run_dir, uninterrupted)


def test_sigkill_loses_only_the_steps_since_the_last_checkpoint(tmp_path, uninterrupted):
    # Checkpoints in a directory of their own, as on a bucket mount that outlives the node.
    spec, run_dir, bucket = write_spec(tmp_path), tmp_path / "run", tmp_path / "bucket"
    assert run_until_step(spec, run_dir, 5, signal.SIGKILL, "--checkpoint-dir", str(bucket)) == -signal.SIGKILL
    last_checkpoint = events_of(run_dir, "checkpoint")[-1]["step"]
    assert not events_of(run_dir, "preempted") and not (run_dir / "checkpoints").exists()
    assert (bucket / f"step-{last_checkpoint:08d}").is_dir()

    result = run_recipe(spec, run_dir, "--attempt", "2", "--checkpoint-dir", str(bucket))
    assert result.returncode == 0, result.stderr
    assert events_of(run_dir, "start")[-1]["resumed_from_step"] == last_checkpoint
    resumed = losses(run_dir, attempt=2)
    assert sorted(resumed) == list(range(last_checkpoint + 1, STEPS + 1))
    assert_same_losses(resumed, losses(uninterrupted))
    assert_same_adapter(run_dir, uninterrupted)


def test_corrupted_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, uninterrupted):
    spec, run_dir = write_spec(tmp_path), tmp_path / "run"
    assert run_until_step(spec, run_dir, 5, signal.SIGTERM) == 75
    saved = [e["step"] for e in events_of(run_dir, "checkpoint")]
    newest, previous = saved[-1], saved[-2]
    weights = Path(events_of(run_dir, "checkpoint")[-1]["path"]) / "model.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))

    result = run_recipe(spec, run_dir, "--attempt", "2")
    assert result.returncode == 0, result.stderr
    skipped, = events_of(run_dir, "checkpoint_skipped")
    assert skipped["step"] == newest and "sha256" in skipped["reason"] and skipped["attempt"] == 2
    assert events_of(run_dir, "start")[-1]["resumed_from_step"] == previous
    assert not events_of(run_dir, "error")
    assert_same_losses(losses(run_dir, attempt=2), losses(uninterrupted))
    assert_same_adapter(run_dir, uninterrupted)


@pytest.mark.parametrize("method", ["full", "qlora"])
def test_method_trains_and_the_loss_falls(tmp_path, method):
    spec = write_spec(tmp_path, method=method, max_steps=6, every_steps=None, train__lr=3e-3)
    run_dir = tmp_path / "run"
    result = run_recipe(spec, run_dir)
    assert result.returncode == 0, result.stderr
    by_step = losses(run_dir)
    assert by_step[6] < by_step[1] - 0.2, by_step
    output = run_dir / "output"
    if method == "full":
        assert (output / "model.safetensors").exists() and (output / "config.json").exists()
    else:
        assert (output / "adapter_model.safetensors").exists()


def test_merge_writes_a_plain_model_that_matches_the_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = write_spec(tmp_path, max_steps=2, every_steps=None)
    run_dir = tmp_path / "run"
    result = run_recipe(spec, run_dir, "--merge")
    assert result.returncode == 0, result.stderr
    merged_dir = run_dir / "output" / "merged"
    assert not (merged_dir / "adapter_config.json").exists()
    from recipes.tiny import local_model_path

    inputs = torch.tensor([[5, 60, 70, 80, 90]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local_model_path("tiny-llama")),
                                        run_dir / "output").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs).logits, adapted(inputs).logits, rtol=1e-4, atol=1e-4)


def _assert_bad_input(result: subprocess.CompletedProcess, run_dir: Path, *words: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]
    assert not (run_dir / "checkpoints").exists()
    assert events_of(run_dir, "error")[-1]["kind"] == "bad_input"


def test_model_that_cannot_load_is_one_line_exit_2(tmp_path):
    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "weights.bin").write_bytes(b"junk")
    spec = write_spec(tmp_path, model=str(not_a_model))
    _assert_bad_input(run_recipe(spec, tmp_path / "run"), tmp_path / "run", "cannot load model", str(not_a_model))


def test_bad_data_line_is_one_line_exit_2(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"instruction": "Say hi", "output": "hi"}\n{"instruction": "broken"\n')
    spec = write_spec(tmp_path, data={"path": str(data), "format": "alpaca"})
    _assert_bad_input(run_recipe(spec, tmp_path / "run"), tmp_path / "run", f"{data}:2", "not valid JSON")


def test_unknown_target_module_is_one_line_exit_2(tmp_path):
    spec = write_spec(tmp_path, lora__target_modules=["attention_projector"])
    _assert_bad_input(run_recipe(spec, tmp_path / "run"), tmp_path / "run", "lora.target_modules",
                      "attention_projector")


def test_qlora_where_bitsandbytes_cannot_run_is_one_line_exit_2(tmp_path):
    # No device here lacks bitsandbytes kernels, so stand in for a node where its native library
    # fails to load (the import error is what bitsandbytes raises there).
    shadow = tmp_path / "shadow" / "bitsandbytes"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise RuntimeError('bitsandbytes native library not found for this device')\n")
    (shadow / "functional.py").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")]))
    spec = write_spec(tmp_path, method="qlora")
    _assert_bad_input(run_recipe(spec, tmp_path / "run", env=env), tmp_path / "run", "qlora", "bitsandbytes")


def test_packed_documents_do_not_attend_to_each_other():
    """The loss of a packed block equals the losses of its documents run one by one."""
    from transformers import AutoModelForCausalLM

    from recipes.modeling import CausalLMLoss
    from recipes.tiny import local_model_path

    lm = AutoModelForCausalLM.from_pretrained(local_model_path("tiny-llama"), attn_implementation="sdpa").eval()
    loss = CausalLMLoss(lm, "sdpa")
    first, second = [1, 70, 71, 72, 73, 74], [1, 80, 81, 82]

    def block(*docs):
        ids = [t for d in docs for t in d]
        labels = [-100 if i == 0 else t for d in docs for i, t in enumerate(d)]
        positions = [i for d in docs for i in range(len(d))]
        document_ids = [n for n, d in enumerate(docs) for _ in d]
        return [torch.tensor([x]) for x in (ids, labels, positions, document_ids)]

    with torch.no_grad():
        packed = loss(*block(first, second))
        separate = loss(*block(first)) + loss(*block(second))
        leaked = CausalLMLoss(lm, "sdpa")(*block(first, second)[:3], torch.zeros(1, 10, dtype=torch.long))
    torch.testing.assert_close(packed, separate, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(packed, leaked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])  # DDP for adapters, FSDP2 for full
def test_two_process_torchrun_matches_a_single_process_run(tmp_path, method):
    """torchrun over gloo on CPU: each rank trains half of every global batch; rank 0 alone reports."""
    spec = write_spec(tmp_path, method=method, max_steps=3, every_steps=2, lora__dropout=0.0)
    single, distributed = tmp_path / "single", tmp_path / "distributed"
    assert run_recipe(spec, single).returncode == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = subprocess.run([*torchrun, "-m", "recipes.sft", str(spec), "--run-dir", str(distributed)], cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [e["step"] for e in events_of(distributed, "step")] == [1, 2, 3]
    assert len(events_of(distributed, "start")) == 1 and len(events_of(distributed, "finished")) == 1
    assert [e["step"] for e in events_of(distributed, "checkpoint")] == [2]
    for step, loss in losses(distributed).items():
        assert loss == pytest.approx(losses(single)[step], rel=1e-4), step
    # Gradients are summed in another order across ranks, so weights agree to float tolerance.
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    got, want = load_file(distributed / "output" / weights), load_file(single / "output" / weights)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-4, msg=name)
