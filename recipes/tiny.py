"""Built-in model `tiny-llama`: a small random-init Llama built locally, never downloaded.

It exists so that the whole pipeline (plan, launch, train, checkpoint, preempt, resume,
reconcile) runs end to end on a CPU in a couple of minutes. The model is built once from a
fixed config and seed into `$SPOTUNE_CACHE/tiny-llama` (default `~/.cache/spotune/tiny-llama`)
and then loaded like any other checkpoint through `from_pretrained`.

The tokenizer is byte-level with no merges: token id == byte value, plus a few special
tokens. It needs no training data, so every machine that builds it (e.g. the next spot node
after a preemption) gets the identical tokenizer, and any UTF-8 text round-trips exactly.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The tokenizer is defined once, torch-free, in the contract: the planner counts tokens with it.
from contract.tokenizer import TINY_CHAT_TEMPLATE as CHAT_TEMPLATE  # noqa: F401
from contract.tokenizer import TINY_ROLE_TOKENS as ROLE_TOKENS
from contract.tokenizer import TINY_SPECIAL_TOKENS as SPECIAL_TOKENS
from contract.tokenizer import TINY_VOCAB_SIZE as VOCAB_SIZE
from contract.tokenizer import tiny_backend

TINY_MODEL_NAME = "tiny-llama"

# Bump when the architecture, seed or tokenizer changes: an older cached build is then rebuilt.
TINY_BUILD_VERSION = 2
_MARKER = "spotune-tiny.json"

# Numbers the planner's built-in model table mirrors (orchestrator/architectures.py).
ARCHITECTURE = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": 1024,
    "tie_word_embeddings": False,
}
SEED = 1234
# Xavier-like for hidden 128 (1/sqrt(128)); the usual 0.02 is tuned for hidden ~2-4k and would cap
# the frozen lm_head's logits near +-2.6, which LoRA (norms and lm_head frozen) cannot lift.
INIT_STD = 0.088


def default_cache_dir() -> Path:
    env = os.environ.get("SPOTUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spotune"


def tiny_model_dir(cache_dir: Path | str | None = None) -> Path:
    return Path(cache_dir).expanduser() / TINY_MODEL_NAME if cache_dir else default_cache_dir() / TINY_MODEL_NAME


def build_tokenizer():
    """A byte-level `PreTrainedTokenizerFast`: ids 0-255 are bytes, then the special tokens."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tiny_backend(),
        **SPECIAL_TOKENS,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=ARCHITECTURE["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    return tokenizer


def build_model(tokenizer):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **ARCHITECTURE,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=INIT_STD,
    )
    # Seed a private RNG state so building the model neither depends on nor disturbs the caller's.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)


def _is_complete(path: Path) -> bool:
    try:
        return json.loads((path / _MARKER).read_text()).get("version") == TINY_BUILD_VERSION
    except (OSError, ValueError):
        return False


def ensure_tiny_model(cache_dir: Path | str | None = None) -> Path:
    """Build tiny-llama the first time, return its directory (a normal `from_pretrained` path).

    The build goes to a temporary sibling directory and is renamed into place, so a reader
    never sees half a model and two racing processes both end up with one complete copy.
    """
    target = tiny_model_dir(cache_dir)
    if _is_complete(target):
        return target
    if _not_rank_zero():
        # Once a process group exists transformers writes a model on global rank 0 only
        # (transformers/distributed/mixin.py, should_save_on_this_rank), and a node of a multi-node
        # run may hold no rank 0: build it in a process of its own, with no group.
        subprocess.run([sys.executable, "-c", "from recipes.tiny import ensure_tiny_model; "
                        f"ensure_tiny_model({str(cache_dir) if cache_dir else None!r})"], check=True)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}.build-", dir=target.parent))
    try:
        tokenizer = build_tokenizer()
        model = build_model(tokenizer)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(json.dumps({"version": TINY_BUILD_VERSION, "seed": SEED, "init_std": INIT_STD, **ARCHITECTURE}))
        if target.exists() and not _is_complete(target):
            # A stale build of an older version: move it aside first (rename is atomic; rmtree is not).
            stale = Path(tempfile.mkdtemp(prefix=f".{TINY_MODEL_NAME}.stale-", dir=target.parent))
            try:
                os.rename(target, stale / TINY_MODEL_NAME)
            except OSError:
                pass  # another process got there first
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            # Lost the race: another process renamed its complete build into place first.
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _not_rank_zero() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def local_model_path(name_or_path: str, cache_dir: Path | str | None = None) -> str:
    """`tiny-llama` -> its local build (built on first use); any other name or path unchanged."""
    if name_or_path == TINY_MODEL_NAME:
        return str(ensure_tiny_model(cache_dir))
    return name_or_path
