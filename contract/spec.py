"""The job spec, as YAML validated by pydantic: one schema for the planner, the backends and the recipe.

`TrainingSpec` holds the sections the recipe runs (model, method, data, batch, checkpoints, the
training loop); `JobSpec` composes it with the planning sections (`constraints`, `local`,
`sky`) that only the control plane reads. Every layer loads a spec file through `load_spec`,
so validation and its one-line errors are written once. The recipe adds one requirement of
its own (`for_training=True`): a dataset file, since `data.examples`/`tokens_per_example` only
size a plan.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from contract.errors import UserError

Method = Literal["full", "lora", "qlora"]
PLANNING_SECTIONS = ("constraints", "local", "sky")


class SpecError(UserError):
    """A spec problem, worded as the one line the user sees."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, le=4096)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


class DataSpec(_Strict):
    path: Optional[str] = None
    # Planning-only sizes, for a plan made before the data exists; never a substitute for `path`
    # when training.
    examples: Optional[int] = Field(None, ge=1)
    tokens_per_example: Optional[int] = Field(None, ge=1)
    format: Literal["auto", "alpaca", "chat", "text"] = "auto"
    completion_only_loss: bool = True
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    on_bad_line: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _path_or_counts(self) -> "DataSpec":
        if self.path is None and (self.examples is None or self.tokens_per_example is None):
            raise ValueError("give either data.path or both data.examples and data.tokens_per_example")
        return self


class BatchSpec(_Strict):
    micro: Union[Literal["auto"], int] = "auto"
    global_: int = Field(32, alias="global", ge=1)

    @field_validator("micro")
    @classmethod
    def _positive(cls, v):
        if v != "auto" and v < 1:
            raise ValueError("must be 'auto' or a positive integer")
        return v


class CheckpointSpec(_Strict):
    every_minutes: Optional[float] = Field(15, gt=0)
    every_steps: Optional[int] = Field(None, ge=1)
    keep: int = Field(2, ge=1)


class TrainSpec(_Strict):
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


class Constraints(_Strict):
    gpus: Optional[list[str]] = None
    providers: Optional[list[str]] = None
    regions: Optional[list[str]] = None
    spot: Literal["auto", "always", "never"] = "auto"
    max_price_per_hour: Optional[float] = Field(None, gt=0)
    budget: Optional[float] = Field(None, gt=0)
    deadline_hours: Optional[float] = Field(None, gt=0)
    max_gpus: int = Field(8, ge=1)


class LocalSpec(_Strict):
    """The hourly-priced backends' price: what an hour of this machine (or cluster) really costs you."""

    price_per_hour: float = Field(0.0, ge=0)
    gpu: Optional[str] = None


class SkySpec(_Strict):
    recovery_strategy: Literal["EAGER_NEXT_REGION", "FAILOVER"] = "EAGER_NEXT_REGION"
    max_restarts_on_errors: int = Field(3, ge=0, le=20)
    bucket: Optional[str] = None
    secrets: list[str] = Field(default_factory=lambda: ["HF_TOKEN"])
    max_options: int = Field(8, ge=1, le=64)


class TrainingSpec(_Strict):
    """What the recipe runs."""

    name: str
    model: str
    method: Method
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: DataSpec
    seq_len: int = Field(2048, ge=8, le=1_048_576)
    epochs: float = Field(1, gt=0)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", v):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-' (at most 63), starting with a letter or digit")
        return v

    # Where the spec file lives; a relative data.path resolves against it. Not part of the spec.
    _base_dir: Path = Path(".")

    def data_path(self) -> Optional[Path]:
        if self.data.path is None:
            return None
        p = Path(self.data.path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json", by_alias=True)

    def spec_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class JobSpec(TrainingSpec):
    """The whole spec: the training sections plus what only the control plane plans with."""

    constraints: Constraints = Field(default_factory=Constraints)
    local: LocalSpec = Field(default_factory=LocalSpec)
    sky: SkySpec = Field(default_factory=SkySpec)

    def node_spec(self, data_path: Optional[str] = None) -> dict[str, Any]:
        """The spec as the node reads it: self-contained, with data.path absolute (or `data_path`,
        where the backend ships the data file elsewhere, such as a bucket mount)."""
        raw = self.to_dict()
        if data_path is not None:
            raw["data"]["path"] = data_path
        elif self.data_path() is not None:
            raw["data"]["path"] = str(self.data_path().resolve())
        return raw


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if p not in ("function-after",)) or "spec"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown field '{loc}'"
    if kind == "missing":
        return f"missing field '{loc}'"
    msg = first["msg"].removeprefix("Value error, ")
    more = len(err.errors()) - 1
    return f"field '{loc}': {msg}" + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def parse_spec(raw: object, base_dir: Path | str = ".", *, for_training: bool = False) -> JobSpec:
    if not isinstance(raw, dict):
        raise SpecError("spec must be a YAML mapping of fields (name, model, method, data, ...)")
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_one_line(e)) from None
    if for_training and spec.data.path is None:
        raise SpecError("missing field 'data.path': training needs a dataset file "
                        "(data.examples/data.tokens_per_example only size a plan)")
    spec._base_dir = Path(base_dir)
    return spec


def load_spec(path: Path | str, *, for_training: bool = False) -> JobSpec:
    """Read and validate a spec file; every problem is a one-line SpecError naming the file."""
    path = Path(path)
    if not path.exists():
        raise SpecError(f"spec file not found: {path}")
    if path.is_dir():
        raise SpecError(f"spec path is a directory, not a YAML file: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None
    try:
        return parse_spec(raw, base_dir=path.resolve().parent, for_training=for_training)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
