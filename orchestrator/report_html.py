"""`spotune ledger --html FILE`: one self-contained page (no network, no external files) with each
job's estimate against actual, its attempts on a timeline with the preemptions marked, the variance
split and the loss curve.

The page carries the very object `spotune ledger --json` prints (plus each job's loss samples and
stop events) in a `<script type="application/json" id="spotune-ledger">` block, and a small script
draws tables and SVG charts from it: what the page shows is the JSON, so the two cannot disagree
(tests/test_report_html.py renders it in headless Chromium and checks).
"""
from __future__ import annotations

import html
import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.format import usd, usd_exact, usd_signed

if TYPE_CHECKING:
    from orchestrator.report_data import Entry

MAX_LOSS_POINTS = 2000  # per job: a long run's curve is thinned evenly, first and last step kept
DATA_ID = "spotune-ledger"


def _thin(samples: list, limit: int = MAX_LOSS_POINTS) -> list:
    if len(samples) <= limit:
        return samples
    stride = (len(samples) - 1) / (limit - 1)
    return [samples[round(i * stride)] for i in range(limit)]


def page_data(entries: list["Entry"], totals: dict, ledger_label: str, now: datetime) -> dict:
    """`ledger --json`'s object, with each job's loss curve and stop events for the charts."""
    from orchestrator.report_data import to_json

    from decimal import Decimal

    from orchestrator.report_data import SPLIT

    data = to_json(entries, totals, ledger_label)
    data["generated_at"] = now.isoformat(timespec="seconds").replace("+00:00", "Z")
    # What the page writes is what the CLI's tables write: cents that add up as shown (the --json
    # figures are exact; the tables round them so that attempts and parts add up to their totals).
    sums = {key: Decimal(0) for key in ("estimate", "actual", "variance", *SPLIT)}
    for job, e in zip(data["jobs"], entries):
        rec = e.rec
        shown = {"estimate": rec.estimate_cost, "actual": rec.actual_cost, "variance": rec.variance,
                 **{part: getattr(rec, part) for part in SPLIT}}
        for key, value in shown.items():
            sums[key] += value
        job["shown"] = {**{k: (usd_signed if k in ("variance", *SPLIT) else usd)(v) for k, v in shown.items()},
                        "attempts": [usd(c) for c in e.attempt_cents],
                        "budget": None if e.job.budget is None else usd_exact(e.job.budget)}
    data["totals"]["shown"] = {k: (usd_signed if k in ("variance", *SPLIT) else usd)(v) for k, v in sums.items()}
    for job, e in zip(data["jobs"], entries):
        points = [s for s in e.samples if s.loss is not None]
        job["loss_curve"] = [{"attempt": s.attempt, "step": s.step, "loss": round(s.loss, 6),
                              "time": s.time.isoformat().replace("+00:00", "Z")} for s in _thin(points)]
    return data


def render_html(entries: list["Entry"], totals: dict, ledger_label: str, now: datetime) -> str:
    data = json.dumps(page_data(entries, totals, ledger_label, now), separators=(",", ":"))
    # Inside <script>, `</` could end the element early: JSON allows the `\/` escape.
    data = data.replace("</", "<\\/")
    return _TEMPLATE.replace("@TITLE@", html.escape(f"spotune ledger, {now:%Y-%m-%d %H:%M} UTC")) \
        .replace("@DATA_ID@", DATA_ID).replace("@DATA@", data)


def write_html(entries: list["Entry"], totals: dict, path: Path, ledger_label: str, now: datetime) -> None:
    """Write the page next to its final name and rename it into place: a reader never sees half a page."""
    from contract.errors import UserError

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(render_html(entries, totals, ledger_label, now), encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the HTML report to {path}: {e.strerror or e}") from None


_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>@TITLE@</title>
<style>
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px auto; max-width: 1100px;
         padding: 0 16px; color: #1d2733; background: #fbfcfd; }
  h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 32px 0 6px; }
  h3 { font-size: 14px; margin: 18px 0 6px; color: #44515f; }
  .meta, .story { color: #55616e; } .story { max-width: 900px; }
  table { border-collapse: collapse; margin: 8px 0; } th, td { padding: 3px 10px; text-align: right; white-space: nowrap; }
  th { border-bottom: 1px solid #9aa7b4; font-weight: 600; } td:first-child, th:first-child { text-align: left; }
  tr.total td { border-top: 1px solid #9aa7b4; font-weight: 600; }
  .job { border-top: 2px solid #d5dce3; margin-top: 28px; }
  .status { display: inline-block; padding: 1px 8px; border-radius: 9px; font-size: 12px; background: #e4e9ee; }
  .status.succeeded { background: #d6f0dc; } .status.over_budget, .status.failed { background: #f7d9d7; }
  .status.cancelled { background: #f6ecd0; }
  svg { display: block; margin: 4px 0 8px; } svg text { font-size: 11px; fill: #33404d; }
  .pos { color: #a33a35; } .neg { color: #2f7a3d; }
</style>
</head>
<body>
<h1>spotune ledger: estimate against actual</h1>
<div class="meta" id="meta"></div>
<div id="summary"></div>
<div id="jobs"></div>
<script type="application/json" id="@DATA_ID@">@DATA@</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("@DATA_ID@").textContent);
const NS = "http://www.w3.org/2000/svg";
const COLORS = {finished: "#3b7d4f", preempted: "#d9822b", failed: "#bc4749", cancelled: "#8d99a6",
                over_budget: "#7b4fa0", running: "#2f5d8a", price: "#d9822b", throughput: "#6a994e",
                preemption: "#bc4749", controller: "#7b4fa0"};
const PARTS = ["price", "throughput", "preemption", "controller"];

function money(v) {            // as the CLI writes it: $1,234.50, -$0.32
  const x = Number(v), s = Math.abs(x).toLocaleString("en-US", {minimumFractionDigits: 2, maximumFractionDigits: 2});
  return (x < 0 ? "-$" : "$") + s;
}
function signed(v) { return (Number(v) < 0 ? "-" : "+") + money(Math.abs(Number(v))); }
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function svg(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function cell(row, text, field, cls) {
  const td = el("td", field ? {"data-field": field} : {}, text);
  if (cls) td.className = cls;
  row.appendChild(td);
}
function table(headers) {
  const t = el("table"), head = el("tr");
  headers.forEach(h => head.appendChild(el("th", {}, h)));
  t.appendChild(head);
  return t;
}
function sign(v) { return Number(v) > 0 ? "pos" : Number(v) < 0 ? "neg" : ""; }

function summary() {
  document.getElementById("meta").textContent =
    `${data.ledger || "ledger"} · ${data.jobs.length} job${data.jobs.length === 1 ? "" : "s"} · generated ${data.generated_at}`;
  const t = table(["job", "status", "estimate", "actual", "variance", "price", "throughput", "preemption"]);
  for (const j of data.jobs) {
    const r = el("tr", {"data-job": j.id});
    cell(r, j.id); cell(r, j.status.replace("_", " "), "status");
    cell(r, j.shown.estimate, "estimate"); cell(r, j.shown.actual, "actual");
    cell(r, j.shown.variance, "variance", sign(j.variance.total));
    for (const p of ["price", "throughput", "preemption"]) cell(r, j.shown[p], p, sign(j.variance[p]));
    t.appendChild(r);
  }
  const tot = data.totals, r = el("tr", {"class": "total", "data-job": "total"});
  cell(r, `total, ${tot.jobs} job${tot.jobs === 1 ? "" : "s"}`); cell(r, "");
  cell(r, tot.shown.estimate, "estimate"); cell(r, tot.shown.actual, "actual");
  cell(r, tot.shown.variance, "variance", sign(tot.variance.total));
  for (const p of ["price", "throughput", "preemption"]) cell(r, tot.shown[p], p, sign(tot.variance[p]));
  t.appendChild(r);
  document.getElementById("summary").appendChild(t);
}

function estimateBars(j) {       // estimate vs actual, side by side
  const W = 520, H = 70, max = Math.max(Number(j.estimate.cost), Number(j.actual.cost), 1e-9), s = svg("svg", {width: W, height: H});
  [["estimate", j.estimate.cost, "#9db4d0", j.shown.estimate], ["actual", j.actual.cost, "#2f5d8a", j.shown.actual]].forEach(([name, v, c, text], i) => {
    const y = 8 + i * 30, w = Math.max(1, 360 * Number(v) / max);
    s.appendChild(svg("text", {x: 0, y: y + 14}, name));
    s.appendChild(svg("rect", {x: 70, y: y, width: w, height: 20, fill: c}));
    s.appendChild(svg("text", {x: 76 + w, y: y + 14, "data-field": name}, text));
  });
  return s;
}

function timeline(j) {           // attempts as bars on wall-clock time; preemptions marked
  const W = 1000, row = 26, H = 40 + row * Math.max(1, j.attempts.length);
  const s = svg("svg", {width: W, height: H, "data-chart": "timeline"});
  if (!j.attempts.length) { s.appendChild(svg("text", {x: 0, y: 20}, "no attempts recorded")); return s; }
  const t0 = Math.min(...j.attempts.map(a => Date.parse(a.started_at)));
  const t1 = Math.max(...j.attempts.map(a => Date.parse(a.ended_at || data.generated_at)));
  const span = Math.max(1, t1 - t0), x = t => 140 + 700 * (t - t0) / span;
  j.attempts.forEach((a, i) => {
    const y = 10 + i * row, start = Date.parse(a.started_at), end = Date.parse(a.ended_at || data.generated_at);
    const reason = a.end_reason || "running";
    s.appendChild(svg("text", {x: 0, y: y + 14}, `attempt ${a.n} · ${a.spot ? "spot" : "on-demand"}`));
    s.appendChild(svg("rect", {x: x(start), y: y, width: Math.max(2, x(end) - x(start)), height: 18,
                               fill: COLORS[reason] || "#2f5d8a", "data-attempt": a.n}));
    if (reason === "preempted") {   // the preemption: a marker where the attempt was cut off
      const px = x(end);
      s.appendChild(svg("path", {d: `M${px - 6},${y - 2} L${px + 6},${y - 2} L${px},${y + 8} Z`, fill: "#bc4749",
                                 "data-preemption": a.n}));
    }
    s.appendChild(svg("text", {x: Math.min(W - 150, x(end) + 10), y: y + 14, "data-field": "attempt-cost"},
                      `${reason.replace("_", " ")} · ${j.shown.attempts[i]}`));
  });
  const axisY = H - 14;
  s.appendChild(svg("line", {x1: 140, x2: 840, y1: axisY - 8, y2: axisY - 8, stroke: "#9aa7b4"}));
  s.appendChild(svg("text", {x: 140, y: axisY + 4}, new Date(t0).toISOString().slice(0, 19).replace("T", " ") + " UTC"));
  s.appendChild(svg("text", {x: 840, y: axisY + 4, "text-anchor": "end"}, `+${(span / 60000).toFixed(1)} min`));
  return s;
}

function varianceSplit(j) {      // each part from zero, the net as a marker
  const parts = PARTS.filter(p => j.variance[p] !== undefined && (p !== "controller" || Number(j.variance[p]) !== 0));
  const vals = parts.map(p => Number(j.variance[p])).concat([Number(j.variance.total)]);
  const m = Math.max(1e-9, ...vals.map(Math.abs)), W = 620, row = 22, H = 16 + row * (parts.length + 1);
  const s = svg("svg", {width: W, height: H, "data-chart": "variance"}), zero = 300, scale = 180 / m;
  s.appendChild(svg("line", {x1: zero, x2: zero, y1: 0, y2: H, stroke: "#33404d"}));
  parts.forEach((p, i) => {
    const v = Number(j.variance[p]), y = 6 + i * row;
    s.appendChild(svg("text", {x: 0, y: y + 13}, p));
    s.appendChild(svg("rect", {x: v < 0 ? zero + v * scale : zero, y: y, width: Math.max(1, Math.abs(v) * scale),
                               height: 16, fill: COLORS[p]}));
    s.appendChild(svg("text", {x: 500, y: y + 13, "data-field": `variance-${p}`}, j.shown[p] || signed(v)));
  });
  const v = Number(j.variance.total), y = 6 + parts.length * row;
  s.appendChild(svg("text", {x: 0, y: y + 13}, "net variance"));
  s.appendChild(svg("path", {d: `M${zero + v * scale},${y + 1} l7,7 l-7,7 l-7,-7 Z`, fill: "#111"}));
  s.appendChild(svg("text", {x: 500, y: y + 13, "data-field": "variance-total"}, j.shown.variance));
  return s;
}

function lossCurve(j) {          // loss by step, one colour per attempt; a resume re-runs steps
  const pts = j.loss_curve, W = 1000, H = 220, s = svg("svg", {width: W, height: H, "data-chart": "loss"});
  if (!pts.length) { s.appendChild(svg("text", {x: 0, y: 20}, "no training steps recorded")); return s; }
  const steps = pts.map(p => p.step), losses = pts.map(p => p.loss);
  const s0 = Math.min(...steps), s1 = Math.max(...steps), l0 = Math.min(...losses), l1 = Math.max(...losses);
  const x = v => 60 + 900 * (v - s0) / Math.max(1, s1 - s0), y = v => 20 + 170 * (l1 - v) / Math.max(1e-12, l1 - l0);
  const palette = ["#2f5d8a", "#d9822b", "#6a994e", "#7b4fa0", "#bc4749"];
  const byAttempt = {};
  pts.forEach(p => (byAttempt[p.attempt] = byAttempt[p.attempt] || []).push(p));
  Object.keys(byAttempt).forEach((n, i) => {
    const line = byAttempt[n].map(p => `${x(p.step).toFixed(1)},${y(p.loss).toFixed(1)}`).join(" ");
    s.appendChild(svg("polyline", {points: line, fill: "none", stroke: palette[i % palette.length], "stroke-width": 1.4,
                                   "data-attempt": n}));
    s.appendChild(svg("text", {x: 70 + i * 90, y: 14, style: `fill: ${palette[i % palette.length]}`}, `attempt ${n}`));
  });
  s.appendChild(svg("text", {x: 0, y: y(l1) + 4}, l1.toFixed(3)));
  s.appendChild(svg("text", {x: 0, y: y(l0) + 4}, l0.toFixed(3)));
  s.appendChild(svg("text", {x: 60, y: H - 8}, `step ${s0}`));
  s.appendChild(svg("text", {x: 960, y: H - 8, "text-anchor": "end"}, `step ${s1}`));
  return s;
}

function jobSection(j) {
  const d = el("section", {"class": "job", "data-job": j.id});
  const h = el("h2", {}, j.id + " ");
  h.appendChild(el("span", {"class": `status ${j.status}`, "data-field": "status"}, j.status.replace("_", " ")));
  d.appendChild(h);
  const est = j.estimate;
  d.appendChild(el("div", {"class": "meta"},
    `${j.model} ${j.method} on ${j.backend} · planned ${est.provider}/${est.region} ${est.gpu_count}x${est.gpu} ` +
    `${est.spot ? "spot" : "on-demand"}, ${Math.round(est.tokens_per_second).toLocaleString("en-US")} tokens/s, ${est.hours} h` +
    (j.shown.budget !== null ? ` · budget ${j.shown.budget}` : "")));
  d.appendChild(el("h3", {}, "Estimate against actual"));
  d.appendChild(estimateBars(j));
  d.appendChild(el("h3", {}, "Attempts (preemptions marked ▼)"));
  d.appendChild(timeline(j));
  d.appendChild(el("h3", {}, "Variance split"));
  d.appendChild(varianceSplit(j));
  d.appendChild(el("h3", {}, "Loss"));
  d.appendChild(lossCurve(j));
  d.appendChild(el("p", {"class": "story"}, j.story));
  return d;
}

summary();
const jobs = document.getElementById("jobs");
for (const j of data.jobs) jobs.appendChild(jobSection(j));
document.body.setAttribute("data-rendered", "yes");
</script>
</body>
</html>
"""
