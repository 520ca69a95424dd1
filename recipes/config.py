"""The recipe's view of a job spec: the training sections of the same YAML the planner reads.

`orchestrator/spec.py` is the control plane's full view. The GPU node installs only the
`train` extra and must not import `orchestrator`, so the training sections are modelled here
again with the same field names and defaults; planning sections (`constraints`, `local`,
`sky`) are accepted as opaque mappings and ignored. `tests/test_recipe_config.py` checks
that both views accept the shipped configs and agree on defaults.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Method = Literal["full", "lora", "qlora"]

PLANNING_SECTIONS = ("constraints", "local", "sky")


class ConfigError(Exception):
    """A training-config problem, worded as the one line the user sees (exit code 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LoraConfig(_Strict):
    r: int = Field(16, ge=1, le=4096)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


class DataConfig(_Strict):
    # Training needs real data; `examples`/`tokens_per_example` are planning-only sizes,
    # accepted here so one spec file serves both, but never a substitute for `path`.
    path: str
    examples: Optional[int] = Field(None, ge=1)
    tokens_per_example: Optional[int] = Field(None, ge=1)
    format: Literal["auto", "alpaca", "chat", "text"] = "auto"
    completion_only_loss: bool = True
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    on_bad_line: Literal["error", "skip"] = "error"


class BatchConfig(_Strict):
    micro: Union[Literal["auto"], int] = "auto"
    global_: int = Field(32, alias="global", ge=1)

    @field_validator("micro")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be 'auto' or a positive integer")
        return v


class CheckpointConfig(_Strict):
    every_minutes: Optional[float] = Field(15, gt=0)
    every_steps: Optional[int] = Field(None, ge=1)
    keep: int = Field(2, ge=1)


class LoopConfig(_Strict):
    """The spec's `train:` section: optimizer, schedule, seed, step limits."""

    lr: float = Field(2e-4, gt=0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = 42
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    gradient_checkpointing: Union[Literal["auto"], bool] = "auto"
    max_steps: Optional[int] = Field(None, ge=1)
    log_every_steps: int = Field(1, ge=1)


class TrainConfig(_Strict):
    name: str
    model: str
    method: Method
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    seq_len: int = Field(2048, ge=8, le=1_048_576)
    epochs: float = Field(1, gt=0)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    train: LoopConfig = Field(default_factory=LoopConfig)

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", v):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-' (at most 63), starting with a letter or digit")
        return v

    # Where the spec file lives; a relative data.path resolves against it.
    _base_dir: Path = Path(".")

    def data_path(self) -> Path:
        p = Path(self.data.path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "spec"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown field '{loc}'"
    if kind == "missing":
        if loc == "data.path":
            return ("missing field 'data.path': training needs a dataset file "
                    "(data.examples/data.tokens_per_example only size a plan)")
        return f"missing field '{loc}'"
    msg = first["msg"].removeprefix("Value error, ")
    more = len(err.errors()) - 1
    return f"field '{loc}': {msg}" + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def parse_train_config(raw: object, base_dir: Path | str = ".") -> TrainConfig:
    if not isinstance(raw, dict):
        raise ConfigError("spec must be a YAML mapping of fields (name, model, method, data, ...)")
    training = {k: v for k, v in raw.items() if k not in PLANNING_SECTIONS}
    for section in PLANNING_SECTIONS:
        if section in raw and raw[section] is not None and not isinstance(raw[section], dict):
            raise ConfigError(f"field '{section}': must be a mapping")
    try:
        cfg = TrainConfig.model_validate(training)
    except ValidationError as e:
        raise ConfigError(_one_line(e)) from None
    cfg._base_dir = Path(base_dir)
    return cfg


def load_train_config(path: Path | str) -> TrainConfig:
    """Read a job spec YAML and validate its training sections; one-line ConfigError on bad input."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"spec file not found: {path}")
    if path.is_dir():
        raise ConfigError(f"spec path is a directory, not a YAML file: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    try:
        return parse_train_config(raw, base_dir=path.resolve().parent)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
