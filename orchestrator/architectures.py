"""Model architectures -> parameter counts, for the planner's memory and throughput models.

A model is named by a local path (a directory holding `config.json`, or the file itself), by any
Hugging Face model id (its config.json from the hub cache, or fetched with huggingface_hub:
orchestrator/hub.py), or by a key of the built-in table: Hugging Face ids (case-insensitive) and
short aliases, for planning offline. An instruct or chat variant the table does not list resolves
to its base model (Qwen2.5-7B-Instruct -> Qwen2.5-7B): fine-tuning does not change the
architecture. Every size is computed from the architecture, never typed in, so the table stays
checkable against each model card: Llama-3.1-8B comes out at 8.03e9 parameters, Llama-3.2-1B at 1.236e9.

All models here are decoder-only transformers with grouped-query attention and a gated MLP
(gate, up, down projections), which covers Llama, Qwen2, Mistral, Gemma 2 and Phi-3.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Optional

from contract.errors import UserError

# PEFT's names for the seven linear projections of every layer ("all-linear" targets them all).
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class UnknownModelError(UserError):
    """The model is neither a local path with config.json nor in the built-in table."""


@dataclass(frozen=True)
class ModelArch:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    head_dim: Optional[int] = None   # Gemma 2 sets it apart from hidden / heads
    qkv_bias: bool = False           # Qwen2 has biases on q, k, v
    max_context: Optional[int] = None  # max_position_embeddings: the longest seq_len it takes (None: unknown)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_size

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_size

    @cached_property
    def _shapes(self) -> dict[str, tuple[int, int]]:
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each linear projection in one layer."""
        return dict(self._shapes)

    @cached_property
    def linear_params(self) -> int:
        """Parameters in the layers' linear projections: what QLoRA quantizes to 4 bits."""
        per_layer = sum(i * o for i, o in self.projection_shapes().values())
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        return self.layers * per_layer

    @cached_property
    def embedding_params(self) -> int:
        """Input embedding plus, when untied, the output head: kept in 16 (or 32) bits by QLoRA."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @cached_property
    def norm_params(self) -> int:
        return (2 * self.layers + 1) * self.hidden

    @cached_property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.norm_params

    def lora_params(self, r: int, target_modules) -> int:
        """Trainable adapter parameters: r x (in + out) for each targeted projection."""
        shapes = self.projection_shapes()
        targets = LINEAR_MODULES if target_modules == "all-linear" else [t for t in target_modules if t in shapes]
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def _arch(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied, **extra) -> ModelArch:
    return ModelArch(name, hidden, layers, heads, kv_heads, intermediate, vocab, tied, **extra)


# Architectures as published in each model's config.json on the Hugging Face Hub.
_TABLE: dict[str, tuple[ModelArch, tuple[str, ...]]] = {}


# max_position_embeddings of each table model's config.json. Where one entry stands for a 4k and a
# 128k variant (Phi-3) or base configs differ by size (Qwen2.5), the larger: this bounds seq_len, it
# never picks it.
_CONTEXT = {"tiny-llama": 1024, "google/gemma-2-2b": 8192, "google/gemma-2-9b": 8192, "google/gemma-2-27b": 8192,
            "mistralai/Mistral-7B-v0.3": 32768, "mistralai/Mistral-7B-v0.1": 32768}
_LONG_CONTEXT = 131072  # Llama 3.1/3.2, Qwen2.5, Phi-3 128k


def _add(arch: ModelArch, *aliases: str) -> None:
    arch = replace(arch, max_context=_CONTEXT.get(arch.name, _LONG_CONTEXT))
    _TABLE[arch.name.lower()] = (arch, aliases)


_add(_arch("tiny-llama", 128, 4, 4, 2, 256, 262, False), "tiny")  # mirrors recipes/tiny.py ARCHITECTURE
_add(_arch("meta-llama/Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True), "llama-3.2-1b", "llama-1b")
_add(_arch("meta-llama/Llama-3.2-3B", 3072, 28, 24, 8, 8192, 128256, True), "llama-3.2-3b", "llama-3b")
_add(_arch("meta-llama/Llama-3.1-8B", 4096, 32, 32, 8, 14336, 128256, False),
     "llama-3.1-8b", "llama-8b", "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct")
_add(_arch("meta-llama/Llama-3.1-70B", 8192, 80, 64, 8, 28672, 128256, False),
     "llama-3.1-70b", "llama-70b", "meta-llama/Llama-3.3-70B-Instruct", "llama-3.3-70b",
     "meta-llama/Llama-3.1-70B-Instruct")
_add(_arch("meta-llama/Llama-3.1-405B", 16384, 126, 128, 8, 53248, 128256, False),
     "llama-3.1-405b", "llama-405b", "meta-llama/Llama-3.1-405B-Instruct")
_add(_arch("Qwen/Qwen2.5-0.5B", 896, 24, 14, 2, 4864, 151936, True, qkv_bias=True), "qwen2.5-0.5b")
_add(_arch("Qwen/Qwen2.5-1.5B", 1536, 28, 12, 2, 8960, 151936, True, qkv_bias=True), "qwen2.5-1.5b")
_add(_arch("Qwen/Qwen2.5-3B", 2048, 36, 16, 2, 11008, 151936, True, qkv_bias=True), "qwen2.5-3b")
_add(_arch("Qwen/Qwen2.5-7B", 3584, 28, 28, 4, 18944, 152064, False, qkv_bias=True), "qwen2.5-7b")
_add(_arch("Qwen/Qwen2.5-14B", 5120, 48, 40, 8, 13824, 152064, False, qkv_bias=True), "qwen2.5-14b")
_add(_arch("Qwen/Qwen2.5-32B", 5120, 64, 40, 8, 27648, 152064, False, qkv_bias=True), "qwen2.5-32b")
_add(_arch("Qwen/Qwen2.5-72B", 8192, 80, 64, 8, 29568, 152064, False, qkv_bias=True), "qwen2.5-72b")
_add(_arch("mistralai/Mistral-7B-v0.3", 4096, 32, 32, 8, 14336, 32768, False),
     "mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3")
_add(_arch("mistralai/Mistral-7B-v0.1", 4096, 32, 32, 8, 14336, 32000, False), "mistral-7b-v0.1")
_add(_arch("google/gemma-2-2b", 2304, 26, 8, 4, 9216, 256000, True, head_dim=256), "gemma-2-2b")
_add(_arch("google/gemma-2-9b", 3584, 42, 16, 8, 14336, 256000, True, head_dim=256), "gemma-2-9b")
_add(_arch("google/gemma-2-27b", 4608, 46, 32, 16, 36864, 256000, True, head_dim=128), "gemma-2-27b")
_add(_arch("microsoft/Phi-3-mini-4k-instruct", 3072, 32, 32, 32, 8192, 32064, False),
     "phi-3-mini", "microsoft/Phi-3-mini-128k-instruct")
_add(_arch("microsoft/Phi-3-small-8k-instruct", 4096, 32, 32, 8, 14336, 100352, True),
     "phi-3-small", "microsoft/Phi-3-small-128k-instruct")
_add(_arch("microsoft/Phi-3-medium-4k-instruct", 5120, 40, 40, 10, 17920, 32064, False),
     "phi-3-medium", "microsoft/Phi-3-medium-128k-instruct")


def _index() -> dict[str, ModelArch]:
    index = {}
    for key, (arch, aliases) in _TABLE.items():
        index[key] = arch
        index[key.split("/")[-1]] = arch  # "Llama-3.1-8B" without the organisation
        for alias in aliases:
            index[alias.lower()] = arch
            index[alias.lower().split("/")[-1]] = arch
    return index


_INDEX = _index()


def builtin_names() -> list[str]:
    return sorted(arch.name for arch, _ in _TABLE.values())


def _config_file(model: str) -> Optional[Path]:
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path / "config.json"
    if path.is_file() and path.name.endswith(".json"):
        return path
    return None


def arch_from_config(config: dict, name: str) -> ModelArch:
    """Architecture from a Hugging Face config.json (multimodal configs nest it in text_config)."""
    cfg = config.get("text_config") or config
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        arch = ModelArch(
            name=name,
            hidden=hidden,
            layers=int(cfg["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(cfg.get("num_key_value_heads") or heads),
            intermediate=int(cfg["intermediate_size"]),
            vocab=int(cfg["vocab_size"]),
            # transformers' PretrainedConfig defaults tie_word_embeddings to True
            tied_embeddings=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", True))),
            head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            max_context=int(cfg["max_position_embeddings"]) if cfg.get("max_position_embeddings") else None,
        )
    except KeyError as e:
        raise UnknownModelError(f"{name}: config.json has no '{e.args[0]}'; cannot size the model") from None
    except (TypeError, ValueError) as e:
        raise UnknownModelError(f"{name}: config.json has a non-numeric size field ({e})") from None
    return arch


# Suffixes of instruct/chat variants, which share their base model's architecture.
_VARIANT = re.compile(r"-(instruct|chat|it)(?=-|$)", re.IGNORECASE)


def _builtin(model: str) -> Optional[ModelArch]:
    for name in (model, _VARIANT.sub("", model)):
        key = name.lower()
        arch = _INDEX.get(key) or _INDEX.get(key.split("/")[-1])
        if arch is not None:
            return arch
    return None


def _read_config(config_file: Path, name: str) -> ModelArch:
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UnknownModelError(f"{config_file}: not a readable JSON config ({e})") from None
    if not isinstance(config, dict):
        raise UnknownModelError(f"{config_file}: config.json must be a JSON object")
    return arch_from_config(config, name)


def resolve_architecture(model: str) -> ModelArch:
    """A local path with config.json, the Hub's config.json for a model id (cached, or fetched
    unless HF_HUB_OFFLINE), else the built-in table; anything else is a UserError saying why."""
    from orchestrator import hub

    config_file = _config_file(model)
    if config_file is not None:
        return _read_config(config_file, model)
    why = ""
    if hub.is_repo_id(model):
        answer = hub.fetch(model, "config.json")
        if answer.path is not None:
            return _read_config(answer.path, model)
        why = f"{answer.why}; "
    arch = _builtin(model)
    if arch is None:
        raise UnknownModelError(
            f"unknown model '{model}': {why}give a local directory with config.json, a Hugging Face model id, "
            f"or one of the built-in models ({', '.join(n.split('/')[-1] for n in builtin_names())})")
    return arch


def model_tokenizer(model: str):
    """The model's tokenizer as a torch-free `contract.tokenizer.FileTokenizer`: tiny-llama's own,
    the tokenizer.json beside a local model, or the Hub's (cached, or fetched unless offline).
    None where there is none to be had: the planner then estimates and says so."""
    from contract.tokenizer import FileTokenizer
    from orchestrator import hub

    path = Path(model).expanduser()
    if path.is_file():
        path = path.parent
    if (path / "tokenizer.json").is_file():
        return FileTokenizer.from_dir(path)
    if not path.exists() and _builtin(model) is not None and _builtin(model).name == "tiny-llama":
        return FileTokenizer.tiny()
    if hub.is_repo_id(model):
        directory = hub.tokenizer_dir(model)
        if directory is not None:
            return FileTokenizer.from_dir(directory)
    return None
