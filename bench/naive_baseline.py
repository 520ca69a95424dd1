"""The naive baseline: full, LoRA and QLoRA steps of a plain PyTorch loop over transformers + PEFT.

This is the loop that measured the H100 anchors (docs/anchors/h100-naive-baseline.json), the
evidence behind orchestrator/estimate/calibration.yaml: random-init Llama-shaped models in bf16,
SDPA attention, one packed batch of random token ids as its own labels, fused AdamW, LoRA r=16
alpha=32 on all 7 linear projections, QLoRA as NF4 + double quantization + bf16 compute through
peft's prepare_model_for_kbit_training. No packing tricks, no chunked loss: it is the yardstick,
not the recipe. bench/bench_recipe.py imports `bench` to run it beside the recipe on the same GPU.

    python bench/naive_baseline.py small|big [--no-upcast]   # writes probe_<which>.json under $OUT or /tmp

`--no-upcast` is the anchors' "one lever": QLoRA without prepare_model_for_kbit_training, so
norms, embeddings and lm_head stay bf16 (input gradients still enabled for checkpointing).
Needs a CUDA GPU, and bitsandbytes for QLoRA.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REFERENCE_PEAK_TFLOPS = 989   # H100 SXM dense bf16: the anchors' MFU is against this
SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP_STEPS = 3
# The anchors' two runs: `small` fits the 1B model's four configurations, `big` the checkpointed and 8B ones.
PLANS = {
    "small": [("llama-1b", "full", 8, 2048, False), ("llama-1b", "lora", 8, 2048, False),
              ("llama-1b", "qlora", 8, 2048, False), ("llama-1b", "lora", 8, 2048, True)],
    "big": [("llama-1b", "qlora", 8, 2048, True), ("llama-8b", "lora", 4, 2048, True),
            ("llama-8b", "qlora", 4, 2048, True), ("llama-8b", "lora", 2, 2048, False)],
}


def _random_llama(config):
    from transformers import LlamaForCausalLM

    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    torch.set_default_dtype(torch.float32)
    return model


def build(name: str, method: str, path_cache: dict, upcast: bool = True):
    """(model ready to train, its config, parameter count before adapters)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

    config = LlamaConfig(**SHAPES[name], max_position_embeddings=4096, attn_implementation="sdpa")
    if method == "qlora":
        # bitsandbytes quantizes while loading, so the random bf16 weights go through a saved copy.
        path = path_cache.get(name)
        if path is None:
            model = _random_llama(config)
            path = str(Path(tempfile.gettempdir()) / name)
            model.save_pretrained(path)
            del model
            gc.collect()
            torch.cuda.empty_cache()
            path_cache[name] = path
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16,
                                                     device_map={"": 0}, attn_implementation="sdpa")
    else:
        model = _random_llama(config)
    params = sum(p.numel() for p in model.parameters())
    if method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if method == "qlora" and upcast:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0,
                                                 task_type="CAUSAL_LM"))
    return model, config, params


def flops_per_token(config, params: int, method: str, seq: int, checkpointing: bool) -> float:
    """6N (full) or 4N (frozen base) plus causal attention, plus a recomputed forward (2N) when checkpointing."""
    attention = 6 * config.num_hidden_layers * config.hidden_size * seq   # 12·L·h·s, halved by the causal mask
    per_token = (6 if method == "full" else 4) * params + attention
    return per_token + (2 * params if checkpointing else 0)


def bench(name: str, method: str, mb: int, seq: int, ckpt: bool, steps: int, path_cache: dict,
          upcast: bool = True) -> dict:
    """One configuration: median step time after warm-up, tokens/s, MFU against the H100 peak, peak memory."""
    torch.cuda.reset_peak_memory_stats()
    model, config, params = build(name, method, path_cache, upcast)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=True)
    batch = torch.randint(0, config.vocab_size, (mb, seq), device="cuda")
    seconds = []
    for _ in range(steps + WARMUP_STEPS):
        torch.cuda.synchronize()
        started = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    measured = sorted(seconds[WARMUP_STEPS:])
    median = measured[len(measured) // 2]
    tokens_per_second = mb * seq / median
    mfu = tokens_per_second * flops_per_token(config, params, method, seq, ckpt) / (REFERENCE_PEAK_TFLOPS * 1e12)
    result = dict(model=name, method=method, mb=mb, seq=seq, ckpt=ckpt, nparams=params,
                  ntrain=sum(p.numel() for p in trainable), step_s=round(median, 4), tok_s=round(tokens_per_second),
                  mfu_vs_989=round(mfu, 3), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    print(json.dumps(result), flush=True)
    del model, optimizer, out
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in PLANS:
        print(__doc__, file=sys.stderr)
        return 2
    which, upcast = argv[0], "--no-upcast" not in argv[1:]
    import peft
    import transformers

    print(json.dumps(dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__,
                          gpu=torch.cuda.get_device_name(0))), flush=True)
    try:
        import bitsandbytes

        print("bitsandbytes", bitsandbytes.__version__, flush=True)
    except Exception as e:   # bitsandbytes can fail on import (CUDA libraries); LoRA and full still run
        print("bitsandbytes import failed:", e, flush=True)
    runs, path_cache = [], {}
    for config in PLANS[which]:
        try:
            runs.append(bench(*config, steps=10, path_cache=path_cache, upcast=upcast))
        except Exception as e:  # one OOM (the anchors' 1B QLoRA without checkpointing) must not end the run
            print("FAIL", config, repr(e)[:500], flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    out = Path(os.environ.get("OUT", tempfile.gettempdir())) / f"probe_{which}.json"
    out.write_text(json.dumps(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
