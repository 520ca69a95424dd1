"""`spotune ledger --plot FILE`: a PNG of estimate vs actual per job, with the variance split.

matplotlib is the optional `plot` extra (`pip install 'spotune[plot]'`); nothing else needs it.
"""
from __future__ import annotations

from pathlib import Path

from contract.errors import UserError
from orchestrator.format import usd_fine
from orchestrator.report_data import SPLIT, Entry

INSTALL_HINT = "--plot needs matplotlib: pip install 'spotune[plot]'"


def require_matplotlib() -> None:
    """A one-line UserError, before any work, where the `plot` extra is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(INSTALL_HINT) from None


def tick_labels(entries: list[Entry]) -> list[str]:
    """Each job with how it ended: a cheap job that stopped over budget is not a cheap success."""
    return [f"{e.job.id}\n{e.job.status.replace('_', ' ')}" for e in entries]


def write_plot(entries: list[Entry], path: Path) -> None:
    require_matplotlib()
    if not entries:
        raise UserError("no jobs in the ledger to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = tick_labels(entries)
    xs = range(len(entries))
    width = 0.38
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(max(6.0, 1.1 * len(entries) + 3), 7),
                                      gridspec_kw={"height_ratios": [3, 2]})
    estimate = [float(e.rec.estimate_cost) for e in entries]
    actual = [float(e.rec.actual_cost) for e in entries]
    top.bar([x - width / 2 for x in xs], estimate, width, label="estimate", color="#9db4d0")
    top.bar([x + width / 2 for x in xs], actual, width, label="actual", color="#2f5d8a")
    for x, est_value, value in zip(xs, estimate, actual):
        top.annotate(usd_fine(est_value), (x - width / 2, est_value), ha="center", va="bottom", fontsize=8)
        top.annotate(usd_fine(value), (x + width / 2, value), ha="center", va="bottom", fontsize=8)
    top.margins(y=0.15)  # room above the tallest bar for its label
    top.set_ylabel("USD")
    top.set_title("Fine-tuning spend: estimate vs actual per job")
    top.legend(loc="upper left")
    colors = {"price": "#d9822b", "throughput": "#6a994e", "preemption": "#bc4749"}
    up, down = [0.0] * len(entries), [0.0] * len(entries)
    for part in SPLIT:
        values = [float(getattr(e.rec, part)) for e in entries]
        bases = [u if v >= 0 else d for v, u, d in zip(values, up, down)]
        bottom.bar(list(xs), values, 0.6, bottom=bases, label=part, color=colors[part])
        up = [u + max(v, 0) for u, v in zip(up, values)]
        down = [d + min(v, 0) for d, v in zip(down, values)]
    # Not clipped at the axes' edge (a job whose whole variance is one part puts the marker on the limit),
    # and a margin so it stays inside the frame.
    bottom.margins(x=0.1, y=0.2)
    bottom.scatter(list(xs), [float(e.rec.variance) for e in entries], marker="D", color="black", zorder=3, clip_on=False,
                   label="net variance")
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_ylabel("variance, USD")
    bottom.set_title("Variance (actual - estimate) split", fontsize=10)
    bottom.legend(loc="best", fontsize=8)
    bottom.set_xticks(list(xs))
    bottom.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
