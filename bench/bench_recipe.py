"""Throughput and peak memory of the recipe's own training step, on the device it runs on.

    python bench/bench_recipe.py            # GPU: 1B full, 8B LoRA, 8B QLoRA at seq 2048, plus the
                                            #      naive baseline in the same run; CPU: tiny-llama
    python bench/bench_recipe.py --mode cpu # force the CPU mode

Each configuration runs in a fresh subprocess (so peak memory is its own) through the real
`recipes.trainer.Trainer`: packed blocks, the method's model setup, chunked loss, AdamW, with
micro-batch and gradient checkpointing chosen by the recipe ('auto'). Models are random-init
Llama shapes saved locally (nothing is downloaded); the data is synthetic text packed into full
blocks. Figures: median optimizer-step time over the measured steps after warm-up; tokens/s =
global batch x seq_len / step time. Writes bench/results/recipe-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {  # the anchors' shapes (docs/anchors/h100-naive-baseline.json)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
GPU_RUNS = [("llama-1b", "full", 2048, 16), ("llama-8b", "lora", 2048, 16), ("llama-8b", "qlora", 2048, 16)]
CPU_RUNS = [("tiny-llama", "full", 256, 8), ("tiny-llama", "lora", 256, 8), ("tiny-llama", "qlora", 256, 8)]
NAIVE_RUNS = [("llama-1b", "full", 8, 2048, False), ("llama-8b", "lora", 4, 2048, True), ("llama-8b", "qlora", 4, 2048, True)]


def _model_dir(name: str, workdir: Path) -> str:
    """A local model directory: tiny-llama's own build, or a random-init Llama shape + byte tokenizer."""
    from recipes.tiny import build_tokenizer, local_model_path

    if name == "tiny-llama":
        return local_model_path(name)
    path = workdir / name
    if not (path / "config.json").exists():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[name], max_position_embeddings=8192))
        torch.set_default_dtype(torch.float32)
        model.save_pretrained(path)
        build_tokenizer().save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return str(path)


def _synthetic_data(path: Path, tokens: int) -> None:
    rng = random.Random(0)
    words = ["spot", "tune", "gpu", "token", "loss", "step", "resume", "adapter", "shard", "cost"]
    with path.open("w") as f:
        written = 0
        while written < tokens:
            text = " ".join(rng.choice(words) for _ in range(rng.randint(50, 400)))
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text)


def bench_one(model: str, method: str, seq: int, global_batch: int, steps: int, warmup: int, workdir: Path) -> dict:
    """One configuration through the real Trainer, in this process."""
    import torch

    from contract.spec import parse_spec
    from contract.events import EventLog
    from recipes.trainer import Trainer

    data = workdir / f"data-{seq}.jsonl"
    if not data.exists():
        _synthetic_data(data, tokens=seq * global_batch * (steps + warmup + 2))
    cfg = parse_spec({
        "name": "bench", "model": _model_dir(model, workdir), "method": method, "seq_len": seq,
        "data": {"path": str(data), "format": "text"}, "batch": {"global": global_batch, "micro": "auto"},
        "train": {"max_steps": steps + warmup, "gradient_checkpointing": "auto", "lr": 1e-5},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
    }, for_training=True)
    run_dir = workdir / f"run-{model}-{method}"
    args = argparse.Namespace(run_dir=run_dir, checkpoint_dir=None, merge=False)
    no_signal = argparse.Namespace(requested=False, signal_name=None)
    trainer = Trainer(cfg, args, EventLog(run_dir / "events.jsonl", attempt=1), no_signal)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps + warmup):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    step_seconds = statistics.median(times[warmup:])
    peak_gib = (torch.cuda.max_memory_allocated() if cuda else
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**30
    return {"model": model, "method": method, "seq": seq, "global_batch": global_batch,
            "micro_batch": trainer.micro, "grad_ckpt": trainer.gradient_checkpointing,
            "attention": trainer.attention, "dtype": str(trainer.dtype).removeprefix("torch."),
            "step_s": round(step_seconds, 4), "tokens_per_second": round(global_batch * seq / step_seconds, 1),
            "peak_gib": round(peak_gib, 2), "peak_kind": "cuda max allocated" if cuda else "process max RSS"}


def naive_one(model: str, method: str, micro: int, seq: int, ckpt: bool, naive_path: Path, workdir: Path) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("naive_baseline", naive_path)
    naive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(naive)
    result = naive.bench(model, method, micro, seq, ckpt, steps=10, path_cache={})
    return {"model": model, "method": method, "seq": seq, "micro_batch": micro, "grad_ckpt": ckpt,
            "tokens_per_second": result["tok_s"], "peak_gib": result["peak_gib"], "step_s": result["step_s"]}


def _in_subprocess(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True, cwd=REPO)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"argv": argv, "failed": (out.stderr.strip().splitlines() or ["no output"])[-1][:500]}
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["auto", "gpu", "cpu"], default="auto")
    p.add_argument("--steps", type=int, default=None, help="measured steps (default 10 on GPU, 4 on CPU)")
    p.add_argument("--naive", type=Path, default=None, help="the naive loop to compare with (default: bench/naive_baseline.py)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--one", nargs=4, metavar=("MODEL", "METHOD", "SEQ", "GLOBAL"), help=argparse.SUPPRESS)
    p.add_argument("--naive-one", nargs=5, metavar=("MODEL", "METHOD", "MICRO", "SEQ", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    workdir = args.workdir or Path(os.environ.get("BENCH_WORKDIR", tempfile.gettempdir())) / "spotune-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    if args.one:
        model, method, seq, global_batch = args.one
        steps = args.steps or 4
        print(json.dumps(bench_one(model, method, int(seq), int(global_batch), steps, 2, workdir)), flush=True)
        return
    if args.naive_one:
        model, method, micro, seq, ckpt = args.naive_one
        print(json.dumps(naive_one(model, method, int(micro), int(seq), ckpt == "1", args.naive, workdir)), flush=True)
        return

    import torch

    gpu = args.mode == "gpu" or (args.mode == "auto" and torch.cuda.is_available())
    steps = args.steps or (10 if gpu else 4)
    runs = GPU_RUNS if gpu else CPU_RUNS
    device = torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    results = {"device": device, "torch": torch.__version__, "measured_steps": steps,
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "recipe": [], "naive": [],
               # Context for CPU figures on a shared machine: other work competes for the cores.
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    print(f"device: {device}", flush=True)
    for model, method, seq, global_batch in runs:
        r = _in_subprocess(["--one", model, method, str(seq), str(global_batch), "--steps", str(steps),
                            "--workdir", str(workdir)])
        results["recipe"].append(r)
        print(f"recipe {model:10s} {method:5s} seq {seq}: " + (
            f"{r['tokens_per_second']:>10,.0f} tok/s  peak {r['peak_gib']:.2f} GiB  micro {r['micro_batch']} "
            f"ckpt {r['grad_ckpt']}" if "failed" not in r else f"FAILED {r['failed']}"), flush=True)
    if gpu:
        naive_path = args.naive or REPO / "bench" / "naive_baseline.py"
        for model, method, micro, seq, ckpt in NAIVE_RUNS:
            r = _in_subprocess(["--naive-one", model, method, str(micro), str(seq), "1" if ckpt else "0",
                                "--naive", str(naive_path), "--workdir", str(workdir)])
            results["naive"].append(r)
            print(f"naive  {model:10s} {method:5s} seq {seq}: " + (
                f"{r['tokens_per_second']:>10,.0f} tok/s  peak {r['peak_gib']:.2f} GiB  micro {micro} ckpt {ckpt}"
                if "failed" not in r else f"FAILED {r['failed']}"), flush=True)
    slug = "".join(c if c.isalnum() else "-" for c in (device if gpu else "cpu").lower()).strip("-")
    out = REPO / "bench" / "results" / f"recipe-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
