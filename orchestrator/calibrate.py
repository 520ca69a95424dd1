"""Calibration from the ledger: every finished attempt is a measurement of the speed and overhead
models, and `spotune calibrate` fits them over the shipped calibration.

Speed: per (device, method), the log ratio measured / predicted tokens/s of each run, predicted by
the shipped model for exactly the config that ran. The fit is the median of those ratios; a run
further from it than OUTLIER_MADS robust standard deviations (1.4826 x MAD) is an outlier, reported
and left out, so one misfit run (a machine under load, a wrong device name) cannot move it. The
error factor comes from the measured spread: the larger of the kept runs' distance from the fit
(widened by 1 + 2/runs) and how far the steps inside those runs strayed from it (STEP_QUANTILE of
them), and never under the shipped error ** (1 / runs). One run says where the speed is, not how
much it varies between runs: its quote keeps the shipped error.

Setup: billed seconds minus trained tokens at the run's median rate minus checkpoint writes, by
`local` start-up (model load term taken out) and cloud `setup`; median, spread as above (a start-up
has no steps: its runs' spread and the shipped floor).

Checkpoint writes: each checkpoint row's bytes over its seconds, by `local` disk or `cloud` store;
median, outliers reported; the planner's checkpoint line uses the fitted rate.

The fit is data (`<state dir>/calibration.json`), loaded by the command layer and applied with
`apply_fit`: the planner stays a pure function of what it is given.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional

from contract.errors import UserError
from orchestrator.estimate import Calibration, CheckpointFit, SetupFit, SpeedFit
from orchestrator.estimate.scaling import across_nodes

FIT_FILE = "calibration.json"
FIT_VERSION = 1
OUTLIER_MADS = 3.5        # Iglewicz and Hoaglin's modified z-score cut-off
MAD_TO_SIGMA = 1.4826     # MAD x this estimates the standard deviation of normal data
LEAST_SIGMA = 0.01        # a 1 % spread: below it, identical runs would make every other run an outlier
# The quote's half-width: the largest distance of a kept run from the fit, widened by 1 + 2/n for
# few runs (the next of n runs lands outside their range with probability 2/(n+1)); never under 2 %
# however alike the runs ...
LEAST_SPREAD = 0.02
# ... nor under the distance from the fit that all but a tenth of the kept runs' steps stayed within:
# steps are what a run's speed is made of, and a machine whose load swings shows it in its steps (a
# shared 2-core CPU's steps spread 20x within one run on 2 threads), a quiet one a narrow band ...
STEP_QUANTILE = 0.9
# ... nor under the shipped error / n (in log): a few alike runs on a shared CPU, whose speed swings
# 94x with its load (calibration.yaml), do not prove the next one will be alike. Seen in
# tests/test_calibration_learns.py on a shared machine: two runs and their 60 steps within 4,757-12,715
# tokens/s, then another tenant doubled the load and the third ran at 3,713. On GPUs (shipped x/÷
# 1.05) the measured spread is what counts.


@dataclass(frozen=True)
class Measurement:
    """One finished attempt, as the speed and overhead models see it."""

    job_id: str
    attempt: int
    device: str
    gpu_count: int
    method: str
    params: int
    micro_batch: int
    seq_len: int
    gradient_checkpointing: bool
    measured_tokens_per_second: float
    predicted_tokens_per_second: float      # the shipped model, unfitted, for this exact config
    local: bool
    setup_seconds: Optional[float] = None   # local: without the model load term
    checkpoint_seconds: float = 0.0
    step_tokens_per_second: tuple[float, ...] = ()   # each step's rate: how much the speed swung in the run

    @property
    def log_ratio(self) -> float:
        return math.log(self.measured_tokens_per_second / self.predicted_tokens_per_second)

    @property
    def step_log_ratios(self) -> list[float]:
        return [math.log(r / self.predicted_tokens_per_second) for r in self.step_tokens_per_second if r > 0]


@dataclass(frozen=True)
class CheckpointWrite:
    """One checkpoint row with its size and write time: a measurement of the write rate."""

    job_id: str
    attempt: int
    step: int
    local: bool               # this machine's disk, else a cloud node's store
    bytes: int
    seconds: float

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9


class CalibrationFitError(UserError):
    """calibration.json is unreadable or from another version."""


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation between order statistics: statistics.quantiles'
    'inclusive' method, which refuses a single value."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def _robust(values: list[float], shipped_spread: float,
            steps: Optional[list[list[float]]] = None) -> tuple[float, float, list[int], list[int]]:
    """(center, error half-width, kept indices, outlier indices) of log-scale values, one per run;
    `steps`: each run's own log-scale step values, whose spread about the center the width holds."""
    center = statistics.median(values)
    sigma = max(MAD_TO_SIGMA * statistics.median(abs(v - center) for v in values), LEAST_SIGMA)
    kept = [i for i, v in enumerate(values) if abs(v - center) <= OUTLIER_MADS * sigma]
    outliers = [i for i in range(len(values)) if i not in kept]
    center = statistics.median(values[i] for i in kept)
    if len(kept) == 1:   # one run says where the speed is, not how much it varies
        return center, shipped_spread, kept, outliers
    spread = max((1 + 2 / len(kept)) * max(abs(values[i] - center) for i in kept), LEAST_SPREAD,
                 shipped_spread / len(kept))
    pooled = [abs(v - center) for i in kept for v in (steps[i] if steps else ())]
    if pooled:
        spread = max(spread, _quantile(pooled, STEP_QUANTILE))
    return center, spread, kept, outliers


def fit(measurements: Iterable[Measurement], cal: Calibration, writes: Iterable[CheckpointWrite] = ()) -> dict:
    """The fit as JSON-able data: speed per (device, method), setup per kind, checkpoint write rate
    per kind, and the outliers."""
    groups: dict[tuple[str, str], list[Measurement]] = {}
    setups: dict[str, list[Measurement]] = {}
    for m in measurements:
        groups.setdefault((m.device, m.method), []).append(m)
        if m.setup_seconds is not None and m.setup_seconds > 0:
            setups.setdefault("local" if m.local else "cloud", []).append(m)
    speed, outliers = [], []
    for (device, method), runs in sorted(groups.items()):
        shipped, _ = cal.speed_uncertainty(device, method)
        center, spread, kept, out = _robust([m.log_ratio for m in runs], math.log(shipped),
                                            steps=[m.step_log_ratios for m in runs])
        speed.append({"device": device, "method": method, "factor": math.exp(center), "error_factor": math.exp(spread),
                      "runs": len(kept), "outliers": len(out)})
        outliers += [{"job": runs[i].job_id, "attempt": runs[i].attempt, "device": device, "method": method,
                      "measured_over_predicted": round(math.exp(runs[i].log_ratio), 4),
                      "fit": round(math.exp(center), 4)} for i in out]
    setup = {}
    for kind, runs in sorted(setups.items()):
        shipped = cal.overheads.local_startup.error_factor if kind == "local" else cal.overheads.setup_error_factor
        center, spread, kept, out = _robust([math.log(m.setup_seconds) for m in runs], math.log(shipped))
        setup[kind] = {"seconds": math.exp(center), "error_factor": math.exp(spread), "runs": len(kept),
                       "outliers": len(out)}
    checkpoint, checkpoint_outliers = {}, []
    by_kind: dict[str, list[CheckpointWrite]] = {}
    for w in writes:
        by_kind.setdefault("local" if w.local else "cloud", []).append(w)
    for kind, items in sorted(by_kind.items()):
        # No shipped error to fall back on: one write's spread is unknown (1.0), and not used by quotes.
        center, spread, kept, out = _robust([math.log(w.gb_per_s) for w in items], 0.0)
        checkpoint[kind] = {"gb_per_s": math.exp(center), "error_factor": math.exp(spread), "writes": len(kept),
                            "outliers": len(out)}
        checkpoint_outliers += [{"job": items[i].job_id, "attempt": items[i].attempt, "step": items[i].step,
                                 "kind": kind, "gb_per_s": round(items[i].gb_per_s, 6), "fit": round(math.exp(center), 6)}
                                for i in out]
    return {"version": FIT_VERSION, "speed": speed, "setup": setup, "outliers": outliers, "checkpoint": checkpoint,
            "checkpoint_outliers": checkpoint_outliers}


def apply_fit(cal: Calibration, data: Optional[dict]) -> Calibration:
    """`cal` with the fit's speed factors and setup figures; unchanged without a fit."""
    if not data:
        return cal
    speed = {(f["device"], f["method"]): SpeedFit(f["device"], f["method"], f["factor"], f["error_factor"], f["runs"],
                                                  f.get("outliers", 0)) for f in data.get("speed", ())}
    setups = {k: SetupFit(f["seconds"], f["error_factor"], f["runs"]) for k, f in data.get("setup", {}).items()}
    writes = {k: CheckpointFit(f["gb_per_s"], f["error_factor"], f["writes"], f.get("outliers", 0))
              for k, f in data.get("checkpoint", {}).items()}
    overheads = cal.overheads
    if "local" in setups:
        overheads = overheads.model_copy(update={"local_startup": overheads.local_startup.model_copy(
            update={"seconds": setups["local"].seconds})})
    if "cloud" in setups:
        overheads = overheads.model_copy(update={"setup_minutes": setups["cloud"].seconds / 60})
    return replace(cal, speed_fits=speed, setup_fits=setups, checkpoint_fits=writes, overheads=overheads)


def read_fit(state_dir: Path) -> Optional[dict]:
    """The fit in the state directory, or None where `spotune calibrate` has not written one."""
    path = Path(state_dir) / FIT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CalibrationFitError(f"{path}: not a calibration fit ({e}); run `spotune calibrate` again") from None
    if not isinstance(data, dict) or data.get("version") != FIT_VERSION:
        raise CalibrationFitError(f"{path}: not a version {FIT_VERSION} calibration fit; run `spotune calibrate` again")
    return data


def fitted_calibration(state_dir: Optional[Path]) -> Calibration:
    """The shipped calibration with the state directory's fit applied, where there is one."""
    from orchestrator.estimate import load_calibration

    cal = load_calibration()
    return cal if state_dir is None else apply_fit(cal, read_fit(state_dir))


def write_fit(state_dir: Path, data: dict) -> Path:
    """Written whole or not at all: a temporary file renamed over the old fit."""
    path = Path(state_dir) / FIT_FILE
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({**data, "fitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")},
                                  indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        if tmp.parent.is_dir():   # nothing half-written left behind
            tmp.unlink(missing_ok=True)
        raise CalibrationFitError(f"cannot write {path}: {e.strerror}") from None
    return path


def _seq_len(spec_yaml: str) -> int:
    import yaml

    from contract.spec import JobSpec

    raw = yaml.safe_load(spec_yaml)
    value = raw.get("seq_len") if isinstance(raw, dict) else None
    return int(value) if isinstance(value, int) else JobSpec.model_fields["seq_len"].default


def measurements_from_ledger(ledger, cal: Calibration) -> tuple[list[Measurement], list[str]]:
    """(measurements, why each skipped attempt was skipped) from every finished training attempt."""
    from orchestrator.architectures import resolve_architecture
    from orchestrator.estimate.throughput import estimate_throughput

    found, skipped, archs = [], [], {}
    for job in ledger.list_jobs():
        try:
            arch = archs.get(job.model) or archs.setdefault(job.model, resolve_architecture(job.model))
        except UserError as e:
            skipped.append(f"{job.id}: {e}")
            continue
        seq_len = _seq_len(job.spec_yaml)
        samples = ledger.samples(job.id)
        checkpoints = ledger.checkpoints(job.id)
        for a in ledger.attempts(job.id):
            if a.kind != "training" or a.ended_at is None:
                continue
            where = f"{job.id} attempt {a.n}"
            micro = a.micro_batch if a.micro_batch is not None else job.estimate.micro_batch
            ckpt = a.gradient_checkpointing if a.gradient_checkpointing is not None else job.estimate.gradient_checkpointing
            rates = [s.tokens_per_second for s in samples if s.attempt == a.n and s.tokens_per_second]
            device = cal.device(a.gpu)
            why = ("no tokens/s samples" if not rates else f"no figures for device '{a.gpu}'" if device is None
                   else "no micro-batch recorded" if micro is None or ckpt is None else None)
            if why:
                skipped.append(f"{where}: {why}")
                continue
            measured = statistics.median(rates)
            # A multi-node attempt's samples are the whole job's tokens/s: predict all its nodes (with the
            # assumed inter-node scaling), so its ratio fits the device's speed like a one-node run's.
            predicted = across_nodes(
                estimate_throughput(arch, job.method, seq_len=seq_len, gradient_checkpointing=ckpt, device=device,
                                    gpu_count=a.gpu_count, cal=cal, micro_batch=micro, fitted=False),
                a.num_nodes, cal)
            writes = sum(c.seconds or 0.0 for c in checkpoints if c.attempt == a.n)
            setup = None
            if a.tokens:
                setup = (a.ended_at - a.started_at).total_seconds() - a.tokens / measured - writes
                if a.provider == "local":   # the plan adds the model load term itself
                    setup -= 2 * arch.params / (cal.overheads.local_startup.model_load_gb_per_s * 1e9)
            found.append(Measurement(job.id, a.n, device.name, a.gpu_count, job.method, arch.params, micro, seq_len, ckpt,
                                     measured, predicted.tokens_per_second, a.provider == "local", setup, writes,
                                     tuple(rates)))
    return found, skipped


def checkpoint_writes_from_ledger(ledger) -> list[CheckpointWrite]:
    """Every checkpoint row with its bytes and a nonzero write time (a preempted attempt's included:
    its writes were real), by where its attempt ran."""
    found = []
    for job in ledger.list_jobs():
        local = {a.n: a.provider == "local" for a in ledger.attempts(job.id) if a.kind == "training"}
        for c in ledger.checkpoints(job.id):
            if c.attempt in local and c.bytes and c.seconds:
                found.append(CheckpointWrite(job.id, c.attempt, c.step, local[c.attempt], c.bytes, c.seconds))
    return found
