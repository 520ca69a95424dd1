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
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator,
                      model_validator)

from contract.errors import UserError
from contract.files import MAX_SPEC_BYTES, FileInputError, path_problem, read_text
from contract.files import shown as files_shown  # `shown` is a local name in load_spec
from contract.execution import ExecutionConfig, grad_accum_for, sharding_for

Method = Literal["full", "lora", "qlora"]
PLANNING_SECTIONS = ("constraints", "local", "sky")


class SpecError(UserError):
    """A spec problem, worded as the one line the user sees."""


# Bounds that follow from what runs: ledger columns (names of 64 characters, money as NUMERIC(18, 6)),
# numpy's seed range (a train.seed of 2**70 would crash every attempt on the node), and sizes
# no fine-tune reaches (an epochs or batch.global of 1e30 is a typo, not a plan). Every number
# must be finite: an .inf learning rate or budget would pass `gt=0` and fail much later.
MAX_LABEL_CHARS = 64               # GPU, provider, region, module and secret names
MAX_LIST_ITEMS = 256               # constraints lists, target_modules, secrets
MAX_MONEY = 1e9                    # USD: budgets and prices, far below NUMERIC(18, 6)'s 10**12
MAX_SEED = 2**32 - 1               # numpy.random.seed's range; torch takes more
MAX_SEQ_LEN = 1_048_576            # the model's own context is checked where the model is known
MAX_BATCH = 65_536                 # sequences per optimizer step
MAX_EPOCHS = 1_000
MAX_STEPS = 10**9
MAX_EXAMPLES = 10**10
MAX_TOTAL_TOKENS = 10**15          # 100x the largest pretraining runs; keeps token counts in BIGINT


def _no_control_characters(value: str) -> str:
    # A newline or a terminal escape in a name would break the one-line errors and the tables that show it.
    if any(ord(c) < 32 or 127 <= ord(c) < 160 for c in value):
        raise ValueError("must not contain control characters (newline, tab, escape, ...)")
    return value


def _usable_path(value: str) -> str:
    problem = path_problem(value)
    if problem is not None:
        raise ValueError(f"is not a usable path: {problem}")
    return value


Label = Annotated[str, StringConstraints(min_length=1, max_length=MAX_LABEL_CHARS), AfterValidator(_no_control_characters)]
# A Hugging Face id or a local path (a path may be as long as the kernel allows: the ledger's column is that wide).
PathLike = Annotated[str, StringConstraints(min_length=1), AfterValidator(_no_control_characters),
                     AfterValidator(_usable_path)]
Money = Annotated[float, Field(le=MAX_MONEY)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


class LoraSpec(_Strict):
    r: int = Field(16, ge=1, le=4096)
    # alpha / r scales the adapter's update: 65536 over r=1 is already far past any published recipe.
    alpha: float = Field(32, gt=0, le=65_536)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[Label]] = Field("all-linear", max_length=MAX_LIST_ITEMS)


class DataSpec(_Strict):
    path: Optional[PathLike] = None
    # Planning-only sizes, for a plan made before the data exists; never a substitute for `path`
    # when training.
    examples: Optional[int] = Field(None, ge=1, le=MAX_EXAMPLES)
    tokens_per_example: Optional[int] = Field(None, ge=1, le=MAX_SEQ_LEN)
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
    global_: int = Field(32, alias="global", ge=1, le=MAX_BATCH)

    @field_validator("micro", mode="before")
    @classmethod
    def _auto_or_count(cls, v):
        # Before the union: otherwise `.inf` is reported as "Input should be 'auto'" by its first branch.
        if v != "auto" and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_BATCH):
            raise ValueError(f"must be 'auto' or an integer from 1 to {MAX_BATCH}")
        return v


# s3://BUCKET[/PREFIX] or gs://BUCKET[/PREFIX], with the bucket named as both stores allow.
_STORE_URL = re.compile(r"(s3|gs)://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?")


class CheckpointSpec(_Strict):
    every_minutes: Optional[float] = Field(15, gt=0, le=7 * 24 * 60)
    every_steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS)
    keep: int = Field(2, ge=1, le=1_000)
    # Where a cloud run keeps its checkpoints and output, under <url>/<spotune job id>/; None: a
    # bucket of its own per job. Runs on this machine keep them in the run directory.
    url: Optional[str] = Field(None, max_length=512)

    @field_validator("url")
    @classmethod
    def _object_store_url(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not _STORE_URL.fullmatch(v):
            raise ValueError("must be an object-store URL: s3://BUCKET[/PREFIX] or gs://BUCKET[/PREFIX]")
        return None if v is None else v.rstrip("/")


class TrainSpec(_Strict):
    """The spec's `train:` section: optimizer, schedule, seed, step limits."""

    lr: float = Field(2e-4, gt=0, le=10)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=10)
    seed: int = Field(42, ge=0, le=MAX_SEED)
    max_grad_norm: Optional[float] = Field(1.0, gt=0, le=1e6)
    gradient_checkpointing: Union[Literal["auto"], bool] = "auto"
    max_steps: Optional[int] = Field(None, ge=1, le=MAX_STEPS)
    log_every_steps: int = Field(1, ge=1, le=MAX_STEPS)


class Constraints(_Strict):
    gpus: Optional[list[Label]] = Field(None, max_length=MAX_LIST_ITEMS)
    providers: Optional[list[Label]] = Field(None, max_length=MAX_LIST_ITEMS)
    regions: Optional[list[Label]] = Field(None, max_length=MAX_LIST_ITEMS)
    spot: Literal["auto", "always", "never"] = "auto"
    max_price_per_hour: Optional[Money] = Field(None, gt=0)
    budget: Optional[Money] = Field(None, gt=0)
    deadline_hours: Optional[float] = Field(None, gt=0, le=100_000)
    max_gpus: int = Field(8, ge=1, le=4_096)    # on one node
    # Nodes one job may span (FSDP/DDP over all their GPUs). 1 keeps every plan on one instance.
    max_nodes: int = Field(1, ge=1, le=1_024)


class LocalSpec(_Strict):
    """The hourly-priced backends' price: what an hour of this machine (or cluster) really costs you."""

    price_per_hour: Money = Field(0.0, ge=0)
    gpu: Optional[Label] = None


class RaySpec(_Strict):
    """The Ray backend: what the cluster's nodes cost, and how Ray Train runs the recipe.

    price_per_node_hour: USD/h by node type; a key is a Ray node's instance type (its
    `instance-type` or `node.kubernetes.io/instance-type` label), its node group (`ray.io/node-group`,
    the autoscaler's or KubeRay's node type), its accelerator type, or `default`
    (launch/ray_pricing.py).
    """

    price_per_node_hour: dict[Label, Annotated[float, Field(ge=0, le=MAX_MONEY)]] = Field(
        default_factory=dict, max_length=MAX_LIST_ITEMS)
    max_failures: int = Field(2, ge=0, le=100)


class SkySpec(_Strict):
    recovery_strategy: Literal["EAGER_NEXT_REGION", "FAILOVER"] = "EAGER_NEXT_REGION"
    max_restarts_on_errors: int = Field(3, ge=0, le=20)
    secrets: list[Label] = Field(default_factory=lambda: ["HF_TOKEN"], max_length=MAX_LIST_ITEMS)
    max_options: int = Field(8, ge=1, le=64)


class TrainingSpec(_Strict):
    """What the recipe runs."""

    name: str
    model: PathLike
    method: Method
    lora: LoraSpec = Field(default_factory=LoraSpec)
    data: DataSpec
    seq_len: int = Field(2048, ge=8, le=MAX_SEQ_LEN)
    epochs: float = Field(1, gt=0, le=MAX_EPOCHS)
    batch: BatchSpec = Field(default_factory=BatchSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    # How the run trains, decided once: a launch fills it in from the chosen plan option (the
    # node spec), a user may pin it; the recipe runs exactly this or says why not (a deviation event).
    execution: Optional[ExecutionConfig] = None

    @model_validator(mode="after")
    def _execution_fits_the_spec(self) -> "TrainingSpec":
        ex = self.execution
        if ex is None:
            return self
        if self.batch.micro != "auto" and ex.micro_batch != self.batch.micro:
            raise ValueError(f"execution.micro_batch {ex.micro_batch} differs from batch.micro {self.batch.micro}")
        fixed = self.train.gradient_checkpointing
        if fixed != "auto" and ex.gradient_checkpointing != fixed:
            raise ValueError(f"execution.gradient_checkpointing {str(ex.gradient_checkpointing).lower()} differs "
                             f"from train.gradient_checkpointing {str(fixed).lower()}")
        world = ex.world_size
        if self.batch.global_ % world:
            raise ValueError(f"batch.global {self.batch.global_} does not split evenly over {world} GPU(s) "
                             "(execution.gpu_count x execution.num_nodes)")
        accum = grad_accum_for(self.batch.global_, ex.micro_batch, world)
        if ex.grad_accum != accum:
            raise ValueError(f"execution.grad_accum must be {accum}: batch.global {self.batch.global_} over "
                             f"micro-batch {ex.micro_batch} x {world} GPU(s)")
        sharding = sharding_for(self.method, world)
        if ex.sharding != sharding:
            raise ValueError(f"execution.sharding must be '{sharding}' for method {self.method} on {world} GPU(s)")
        return self

    @field_validator("name")
    @classmethod
    def _slug(cls, v: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,62}", v):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-' (at most 63), starting with a letter or digit")
        return v

    @model_validator(mode="after")
    def _tokens_fit(self) -> "TrainingSpec":
        if self.data.examples is not None and self.data.tokens_per_example is not None:
            total = self.data.examples * self.data.tokens_per_example * self.epochs
            if total > MAX_TOTAL_TOKENS:
                raise ValueError(f"data.examples x data.tokens_per_example x epochs is {total:.3g} tokens, "
                                 f"over the {MAX_TOTAL_TOKENS:.0e} a plan can count")
        return self

    # Where the spec file lives; a relative data.path resolves against it. Not part of the spec.
    _base_dir: Path = Path(".")

    def data_path(self) -> Optional[Path]:
        if self.data.path is None:
            return None
        p = Path(self.data.path).expanduser()
        return p if p.is_absolute() else (self._base_dir / p)

    def to_dict(self) -> dict:
        # No `execution: null` in a spec without one: its hash stays what it was before the section existed.
        return self.model_dump(mode="json", by_alias=True, exclude={"execution"} if self.execution is None else None)

    def spec_hash(self) -> str:
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


class JobSpec(TrainingSpec):
    """The whole spec: the training sections plus what only the control plane plans with."""

    constraints: Constraints = Field(default_factory=Constraints)
    local: LocalSpec = Field(default_factory=LocalSpec)
    sky: SkySpec = Field(default_factory=SkySpec)
    ray: RaySpec = Field(default_factory=RaySpec)

    def node_spec(self, data_path: Optional[str] = None, execution: Optional[ExecutionConfig] = None) -> dict[str, Any]:
        """The spec as the node reads it: self-contained, with data.path absolute (or `data_path`,
        where the backend ships the data file elsewhere, such as a bucket mount), and `execution`
        (the chosen plan option's config) where the launch gives one."""
        raw = self.to_dict()
        if execution is not None:
            raw["execution"] = execution.to_json()
        if data_path is not None:
            raw["data"]["path"] = data_path
        elif self.data_path() is not None:
            raw["data"]["path"] = str(self.data_path().resolve())
        return raw


def _union_branch(part) -> bool:
    """A location part that names a branch of a union (`literal['auto']`, `list[...]`, `bool`), not a field."""
    return isinstance(part, str) and (part in ("int", "float", "bool", "str") or "[" in part)


def _first_problem(errors: list) -> tuple[dict, int]:
    """The error to show and how many others there are. A union field fails once per branch; the
    deepest branch error (a bad list item), or else a non-literal one, says what is wrong with it."""
    first = errors[0]
    branch = next((i for i, part in enumerate(first["loc"]) if _union_branch(part)), None)
    if branch is None:
        return first, len(errors) - 1
    same_field = [e for e in errors if e["loc"][:branch] == first["loc"][:branch]]
    best = max(same_field, key=lambda e: (len(e["loc"]), not str(e["loc"][branch]).startswith("literal")))
    return best, len(errors) - len(same_field)


def _one_line(err: ValidationError) -> str:
    first, more = _first_problem(err.errors())
    loc = ".".join(str(p) for p in first["loc"] if not _union_branch(p)) or "spec"
    kind = first["type"]
    if kind == "extra_forbidden":
        return f"unknown field '{loc}'"
    if kind == "missing":
        return f"missing field '{loc}'"
    msg = first["msg"].removeprefix("Value error, ")
    # A check across sections (the execution section against batch and train, the token total) names its fields itself.
    where = "" if not first["loc"] else f"field '{loc}': "
    return f"{where}{msg}" + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


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


# libyaml's parser where PyYAML was built with it: a 100k-item list parses in 0.2 s instead of 2 s,
# and nesting past its depth limit is a YAMLError instead of a RecursionError. Same safe constructors.
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_spec(path: Path | str, *, for_training: bool = False) -> JobSpec:
    """Read and validate a spec file; every problem is a one-line SpecError naming the file. The
    file must be a regular UTF-8 file of at most MAX_SPEC_BYTES (contract/files.py says why)."""
    try:
        text = read_text(path, "spec file", MAX_SPEC_BYTES)
    except FileInputError as e:
        raise SpecError(str(e)) from None
    path = Path(path)
    shown = files_shown(path)
    try:
        raw = yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise SpecError(f"{shown}: malformed YAML{where}: {problem}") from None
    except RecursionError:
        raise SpecError(f"{shown}: YAML nested too deeply to be a spec") from None
    try:
        return parse_spec(raw, base_dir=path.resolve().parent, for_training=for_training)
    except RecursionError:
        raise SpecError(f"{shown}: nested too deeply to be a spec") from None
    except SpecError as e:
        raise SpecError(f"{shown}: {e}") from None
