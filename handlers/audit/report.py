"""The audit report: a self-contained HTML page of audit records (``python -m handlers.audit report``).

Records come from the SQLite sink, the PostgreSQL sink or a log holding the stdout sink's JSON lines
(:func:`load_records`); :func:`render_report` draws the page: the prediction mix (top-1 class per time
bucket) and the faithfulness of each record over time as inline SVG, and a table of records with
overlay thumbnails as data URIs, filtered by class and confidence with a few lines of inline JS.
Nothing in the page is fetched from anywhere.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import re
import sqlite3
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cam_engine.image import colorize, overlay

from .sinks import JSON_COLUMNS

__all__ = ["load_records", "render_report", "parse_since", "model_counts", "endpoint_of", "READING_FAITHFULNESS"]


def parse_since(value: str | None, now: float | None = None) -> float:
    """``30m``, ``24h``, ``7d``, ``90s`` (before now) or an ISO date/time (UTC unless it says) -> epoch."""
    now = time.time() if now is None else now
    if not value:
        return now - 24 * 3600
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if match:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return now - float(match.group(1)) * unit
    try:
        moment = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"--since: {value!r} is neither a duration (30m, 24h, 7d) nor an ISO date/time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.timezone.utc)
    return moment.timestamp()


def load_records(
    db: Path | None = None,
    jsonl: Path | None = None,
    since: float = 0.0,
    model: str | None = None,
    limit: int = 2000,
    dsn: str | None = None,
) -> list[dict[str, Any]]:
    """Records newer than ``since`` (epoch), newest first, from the SQLite sink, the PostgreSQL sink
    (``dsn``) or a JSON-lines log."""
    if dsn:
        from .postgres import load_records_postgres

        return load_records_postgres(dsn, since, model, limit)
    records: list[dict[str, Any]] = []
    if db is not None:
        connection = sqlite3.connect(f"file:{Path(db)}?mode=ro", uri=True, timeout=30)
        connection.row_factory = sqlite3.Row
        try:
            query = "SELECT * FROM audit_records WHERE epoch >= ?"
            arguments: list[Any] = [since]
            if model:
                query += " AND model = ?"
                arguments.append(model)
            query += " ORDER BY epoch DESC, id DESC LIMIT ?"
            arguments.append(limit)
            for row in connection.execute(query, arguments):
                record = dict(row)
                for column in JSON_COLUMNS:
                    record[column] = json.loads(record[column]) if record[column] else []
                records.append(record)
        finally:
            connection.close()
    if jsonl is not None:
        for line in Path(jsonl).read_text(errors="replace").splitlines():
            start = line.find('{"type":"cam_audit_record"')
            if start < 0:
                continue
            try:
                record = json.loads(line[start:])
            except ValueError:
                continue
            if record.get("epoch", 0) >= since and (not model or record.get("model") == model):
                records.append(record)
        records.sort(key=lambda r: r.get("epoch", 0), reverse=True)
        records = records[:limit]
    return records


def model_counts(db: Path | None = None, jsonl: Path | None = None, dsn: str | None = None) -> dict[str, int]:
    """``{model: number of records}`` over the whole database or log (any age)."""
    if dsn:
        from .postgres import model_counts_postgres

        return model_counts_postgres(dsn)
    counts: Counter[str] = Counter()
    if db is not None:
        connection = sqlite3.connect(f"file:{Path(db)}?mode=ro", uri=True, timeout=30)
        try:
            counts.update(dict(connection.execute("SELECT model, COUNT(*) FROM audit_records GROUP BY model")))
        finally:
            connection.close()
    if jsonl is not None:
        for line in Path(jsonl).read_text(errors="replace").splitlines():
            start = line.find('{"type":"cam_audit_record"')
            if start >= 0:
                try:
                    counts[str(json.loads(line[start:]).get("model"))] += 1
                except ValueError:
                    continue
    return dict(counts)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _thumbnail(record: Mapping[str, Any], root: Path | None, size: int = 112) -> tuple[str | None, str]:
    """(a PNG data URI of the overlay - or of the colour-mapped heatmap when no input is stored -, its kind)."""
    from PIL import Image, ImageOps

    explanations = record.get("explanations") or []
    heatmap_png: bytes | None = None
    if explanations and explanations[0].get("heatmap_png"):
        heatmap_png = base64.b64decode(explanations[0]["heatmap_png"])
    elif root is not None and record.get("heatmap_path") and (root / record["heatmap_path"]).is_file():
        heatmap_png = (root / record["heatmap_path"]).read_bytes()
    if heatmap_png is None:
        return None, "none"
    stored_input = record.get("input_data")  # PostgreSQL: the bytes themselves
    if stored_input is None and root is not None and record.get("input_path") and (root / record["input_path"]).is_file():
        stored_input = (root / record["input_path"]).read_bytes()
    heatmap = Image.open(io.BytesIO(heatmap_png)).convert("L")
    heatmap.thumbnail((size, size))
    cam = torch.from_numpy(np.asarray(heatmap, dtype=np.float32) / 255.0)
    kind = "heatmap"
    picture = colorize(cam).numpy()
    if stored_input is not None:
        try:
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(stored_input))).convert("RGB")
            image = image.resize(heatmap.size, Image.Resampling.BILINEAR)
            picture = overlay(torch.from_numpy(np.asarray(image).copy()), cam).numpy()
            kind = "overlay"
        except OSError:
            pass
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", optimize=True)
    return _data_uri(buffer.getvalue()), kind


PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
OTHER_COLOUR = "#bab0ac"


def _time_label(epoch: float, span: float) -> str:
    moment = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    return moment.strftime("%H:%M:%S" if span < 3600 else "%m-%d %H:%M" if span < 3 * 86400 else "%Y-%m-%d")


def _mix_svg(records: Sequence[Mapping[str, Any]], buckets: int = 20) -> str:
    """Stacked bars: the top-1 class mix per time bucket (top 8 classes, the rest as "other")."""
    width, height, left, bottom, top_pad = 720, 260, 44, 36, 10
    if not records:
        return '<svg id="mix-plot" width="720" height="40"><text x="8" y="24">no records</text></svg>'
    epochs = [r["epoch"] for r in records]
    start, end = min(epochs), max(epochs)
    span = max(end - start, 1e-6)
    buckets = max(1, min(buckets, len(records)))
    counts = Counter(r.get("top_label") or "?" for r in records)
    named = [label for label, _ in counts.most_common(len(PALETTE) - 1)]
    colour = {label: PALETTE[i] for i, label in enumerate(named)}
    table = [Counter() for _ in range(buckets)]
    for r in records:
        slot = min(buckets - 1, int((r["epoch"] - start) / span * buckets))
        label = r.get("top_label") or "?"
        table[slot][label if label in colour else "other"] += 1
    tallest = max(sum(c.values()) for c in table)
    plot_w, plot_h = width - left - 150, height - bottom - top_pad
    bar_w = plot_w / buckets
    parts = [f'<svg id="mix-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             '<title>Prediction mix (top-1 class) over time</title>',
             f'<line x1="{left}" y1="{top_pad + plot_h}" x2="{left + plot_w}" y2="{top_pad + plot_h}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#333"/>',
             f'<text x="{left - 6}" y="{top_pad + 10}" text-anchor="end" font-size="11">{tallest}</text>',
             f'<text x="{left - 6}" y="{top_pad + plot_h}" text-anchor="end" font-size="11">0</text>']  # fmt: skip
    for slot, bucket in enumerate(table):
        y = top_pad + plot_h
        for label in [*named, "other"]:
            n = bucket.get(label, 0)
            if not n:
                continue
            h = n / tallest * plot_h
            y -= h
            parts.append(
                f'<rect class="mix-bar" x="{left + slot * bar_w + 1:.1f}" y="{y:.1f}" width="{max(bar_w - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="{colour.get(label, OTHER_COLOUR)}"><title>{html.escape(label)}: {n}</title></rect>'
            )
    for slot in (0, buckets // 2, buckets - 1) if buckets > 2 else range(buckets):
        x = left + (slot + 0.5) * bar_w
        label = _time_label(start + (slot + 0.5) / buckets * span, span)
        parts.append(f'<text x="{x:.1f}" y="{height - 14}" text-anchor="middle" font-size="11">{label}</text>')
    for i, label in enumerate([*named, "other"] if len(counts) > len(named) else named):
        y = top_pad + 14 * i
        parts.append(f'<rect x="{width - 140}" y="{y}" width="10" height="10" fill="{colour.get(label, OTHER_COLOUR)}"/>')
        parts.append(f'<text x="{width - 124}" y="{y + 9}" font-size="11">{html.escape(label[:20])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _faithfulness_svg(records: Sequence[Mapping[str, Any]], buckets: int = 20) -> str:
    """Faithfulness (confidence drop, -1..1) of each record over time, with the per-bucket median."""
    points = [(r["epoch"], r["faithfulness"]) for r in records if isinstance(r.get("faithfulness"), (int, float))]
    if not points:
        return ('<svg id="faithfulness-plot" width="720" height="40"><text x="8" y="24">'
                "no faithfulness scores (handler.audit.faithfulness is off)</text></svg>")  # fmt: skip
    width, height, left, bottom, top_pad = 720, 260, 44, 36, 10
    plot_w, plot_h = width - left - 150, height - bottom - top_pad
    start = min(p[0] for p in points)
    span = max(max(p[0] for p in points) - start, 1e-6)

    def xy(epoch: float, value: float) -> tuple[float, float]:
        return left + (epoch - start) / span * plot_w, top_pad + (1 - (max(-1.0, min(1.0, value)) + 1) / 2) * plot_h

    parts = [f'<svg id="faithfulness-plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             "<title>Faithfulness: drop in target confidence with the top 20% of the heatmap removed</title>",
             f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + plot_h}" stroke="#333"/>',
             f'<line x1="{left}" y1="{xy(start, 0)[1]:.1f}" x2="{left + plot_w}" y2="{xy(start, 0)[1]:.1f}" stroke="#999" stroke-dasharray="4 3"/>']  # fmt: skip
    for value in (1, 0, -1):
        parts.append(f'<text x="{left - 6}" y="{xy(start, value)[1] + 4:.1f}" text-anchor="end" font-size="11">{value}</text>')
    for epoch, value in points:
        x, y = xy(epoch, value)
        parts.append(f'<circle class="faithfulness-point" cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#4e79a7" fill-opacity="0.6"/>')
    slots: dict[int, list[float]] = {}
    for epoch, value in points:
        slots.setdefault(min(buckets - 1, int((epoch - start) / span * buckets)), []).append(value)
    line = [xy(start + (slot + 0.5) / buckets * span, float(np.median(values))) for slot, values in sorted(slots.items())]
    if len(line) > 1:
        parts.append('<polyline fill="none" stroke="#e15759" stroke-width="2" points="'
                     + " ".join(f"{x:.1f},{y:.1f}" for x, y in line) + '"/>')  # fmt: skip
    parts.append(f'<text x="{width - 140}" y="{top_pad + 10}" font-size="11" fill="#e15759">median per bucket</text>')
    parts.append(f'<text x="{width - 140}" y="{top_pad + 26}" font-size="11" fill="#4e79a7">one record</text>')
    for epoch in (start, start + span / 2, start + span):
        parts.append(
            f'<text x="{xy(epoch, 0)[0]:.1f}" y="{height - 14}" text-anchor="middle" font-size="11">{_time_label(epoch, span)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


REPORT_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px} h2{font-size:16px;margin-top:28px}
figure{display:inline-block;margin:0 24px 12px 0} figcaption{font-size:13px;color:#555}
table{border-collapse:collapse;font-size:12px} th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:middle}
th{background:#f4f4f4;position:sticky;top:0} td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:11px} .filters{margin:12px 0;font-size:14px} .filters label{margin-right:16px}
img.thumb{display:block;max-width:112px;max-height:112px;image-rendering:auto}
.muted{color:#888}
"""

REPORT_SCRIPT = """
(function(){
  var cls=document.getElementById('class-filter'), lo=document.getElementById('min-confidence'),
      hi=document.getElementById('max-confidence'), shown=document.getElementById('shown-count');
  var rows=Array.prototype.slice.call(document.querySelectorAll('#records tbody tr.record'));
  function apply(){
    var want=cls.value, min=parseFloat(lo.value), max=parseFloat(hi.value), n=0;
    if(isNaN(min)) min=0; if(isNaN(max)) max=1;
    rows.forEach(function(row){
      var score=parseFloat(row.getAttribute('data-score'));
      var ok=(!want||row.getAttribute('data-label')===want)&&(isNaN(score)?min<=0:(score>=min&&score<=max));
      row.style.display=ok?'':'none'; if(ok) n++;
    });
    shown.textContent=n+' of '+rows.length+' records shown';
  }
  [cls,lo,hi].forEach(function(el){el.addEventListener('input',apply);el.addEventListener('change',apply);});
  apply();
})();
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return '<span class="muted">-</span>'
    if isinstance(value, float):
        return f"{round(value, digits) + 0.0:.{digits}f}"  # + 0.0: no "-0.000"
    return html.escape(str(value))


READING_FAITHFULNESS = (
    "How to read faithfulness: the drop in the target's confidence (softmax probability for classifiers) "
    "when the hottest 20% of the heatmap's pixels are removed from the model input, before minus after, "
    "in [-1, 1]. remove_top sets those pixels to the mean colour; road (ROAD, Rong et al. 2022) fills them "
    "by noisy linear imputation from their neighbours, so that the model sees no sharp-edged hole (the shape "
    "of a mask alone can move a prediction). Large and positive: the model needed what the heatmap points at. "
    "Near 0: it did not need it (or found the same evidence elsewhere). Negative: the target gained "
    "probability. Softmax probabilities are shares: with fine-grained classes (Egyptian cat, tabby, tiger cat) "
    "masking the part that tells siblings apart moves probability among the siblings, and the target can gain "
    "as a sibling loses more; the cell names the top class once masked and the predicted class that moved most "
    "(on skimage's cat photo: Egyptian cat 0.54\u21920.60 as tiger cat fell 0.20\u21920.14). One negative record does not prove a "
    "wrong map; a median near or below 0 over many records of one class and method is a reason to look. "
    "Compare scores of one model, method and perturbation: remove_top and road are on different scales."
)
CONCENTRATION_TITLE = ("share of the heatmap's mass in its hottest 10% of pixels: 0.10 = spread evenly over the "
                       "image, 1 = all of it there")  # fmt: skip


def endpoint_of(record: Mapping[str, Any]) -> str:
    """``/predictions`` or ``/explanations``: the endpoint the audited request came to (KServe ``:explain``
    and v2 ``/explain`` count as explanations); records written before the field existed say whether
    the answer carried explanations instead."""
    endpoint = record.get("endpoint")
    if endpoint:
        return f"/{endpoint}"
    return ("/explanations" if record.get("explained") else "/predictions") + " (inferred)"


def _faithfulness_cell(record: Mapping[str, Any]) -> str:
    value = record.get("faithfulness")
    if not isinstance(value, (int, float)):
        return _fmt(None)
    explanations = record.get("explanations") or []
    details = explanations[0].get("faithfulness", {}) if explanations and isinstance(explanations[0], Mapping) else {}
    notes = [str(details.get("perturbation", "remove_top"))]
    after = details.get("after_top")
    if isinstance(after, Mapping) and after.get("label") is not None:
        notes.append(f"after: {after['label']} {after.get('score', 0):.2f}")
    target = explanations[0].get("target")
    others = [s for s in details.get("shifts") or [] if isinstance(s, Mapping) and s.get("index") != target]
    if others:  # the predicted class other than the target that moved most: where the probability went
        moved = max(others, key=lambda s: abs(s["after"] - s["before"]))
        notes.append(f"{moved.get('label') or moved['index']} {moved['before']:.2f}\u2192{moved['after']:.2f}")
    return f'{_fmt(float(value))}<br><span class="muted">{html.escape(" · ".join(notes))}</span>'


def render_report(records: Sequence[Mapping[str, Any]], root: Path | None, title: str = "Prediction audit") -> str:
    """A self-contained HTML page (no external asset: thumbnails are data URIs, plots inline SVG).

    Sections: summary; the prediction mix (top-1 class) over time; the faithfulness distribution over
    time; a table of records (newest first) with overlay thumbnails (the heatmap over the stored input,
    or the colour-mapped heatmap alone when inputs are not stored) and filters by class and confidence.
    ``root``: the audit directory that relative heatmap/input paths start from.
    """
    records = list(records)
    ordered = sorted(records, key=lambda r: r.get("epoch", 0))
    labels = sorted({r.get("top_label") for r in records if r.get("top_label")})
    models = sorted({f"{r.get('model')} {r.get('version')}" for r in records})
    span = ""
    if records:
        span = f"from {ordered[0]['timestamp']} to {ordered[-1]['timestamp']}"
    faith = [r["faithfulness"] for r in records if isinstance(r.get("faithfulness"), (int, float))]
    faith_text = (
        f"faithfulness: median drop {np.median(faith):.3f} over {len(faith)} scored records" if faith else "no faithfulness scores"
    )
    rows = []
    for record in records:
        thumb, kind = _thumbnail(record, root)
        image = (f'<img class="thumb" alt="{kind}" title="{kind}" src="{thumb}">' if thumb
                 else '<span class="muted">no heatmap stored</span>')  # fmt: skip
        targets = ", ".join(
            f"{t.get('target')}" + (f" ({t['label']})" if t.get("label") else "") for t in record.get("targets") or []
        )
        peak = (f"({record['peak_x']}, {record['peak_y']})" if record.get("peak_x") is not None else None)
        score = record.get("top_score")
        rows.append(
            f'<tr class="record" data-label="{html.escape(record.get("top_label") or "", quote=True)}" '
            f'data-score="{"" if score is None else score}">'
            f"<td>{image}</td><td>{_fmt(record.get('timestamp'))}<br><code>{_fmt(record.get('request_id'))}</code></td>"
            f"<td>{_fmt(record.get('model'))} {_fmt(record.get('version'))}</td><td>{html.escape(endpoint_of(record))}</td>"
            f"<td>{_fmt(record.get('top_label'))}</td><td class=\"num\">{_fmt(score)}</td>"
            f"<td>{_fmt(record.get('method'))}<br><span class=\"muted\">{_fmt(', '.join(record.get('layers') or []))}</span></td>"
            f"<td>{html.escape(targets) or _fmt(None)}</td><td>{_fmt(peak)}</td>"
            f"<td class=\"num\">{_fmt(record.get('top10_mass'))}</td><td class=\"num\">{_faithfulness_cell(record)}</td>"
            f"<td>{record.get('image_width')}x{record.get('image_height')}<br><code title=\"{_fmt(record.get('input_sha256'))}\">"
            f"{_fmt((record.get('input_sha256') or '')[:12])}</code></td></tr>"
        )
    options = "".join(f'<option value="{html.escape(label, quote=True)}">{html.escape(label)}</option>' for label in labels)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{html.escape(title)}</title><style>{REPORT_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p id="summary">{len(records)} records {html.escape(span)} &middot; {html.escape(", ".join(models))} &middot; {html.escape(faith_text)}</p>
<h2>Over time</h2>
<figure>{_mix_svg(ordered)}<figcaption>Prediction mix: top-1 class of the audited requests per time bucket</figcaption></figure>
<figure>{_faithfulness_svg(ordered)}<figcaption>Faithfulness: drop in target confidence when the top 20% of the heatmap is removed</figcaption></figure>
<p id="reading-faithfulness" style="max-width:960px;font-size:13px">{html.escape(READING_FAITHFULNESS)}</p>
<p id="reading-concentration" style="max-width:960px;font-size:13px">Top-10% mass: {html.escape(CONCENTRATION_TITLE)}.
It replaces the normalised entropy of earlier reports, which measures the same spread but sits at 0.93-0.99 for
any smooth map of a photo (the log of ~10<sup>5</sup> pixels swamps it): a Gaussian blob a fifth of the image
high reads 0.46 here and 0.93 in entropy, one twice as wide 0.19 and 0.99. A concentrated map can still point at
the wrong thing: faithfulness says that.</p>
<h2>Records</h2>
<div class="filters">
<label>class <select id="class-filter"><option value="">all classes</option>{options}</select></label>
<label>confidence from <input id="min-confidence" type="number" min="0" max="1" step="0.05" value="0"></label>
<label>to <input id="max-confidence" type="number" min="0" max="1" step="0.05" value="1"></label>
<span id="shown-count"></span></div>
<table id="records"><thead><tr><th>overlay</th><th>time (UTC) / request id</th><th>model</th><th>endpoint</th><th>top-1</th><th>score</th>
<th>method / layers</th><th>targets</th><th>peak (x, y)</th><th title="{html.escape(CONCENTRATION_TITLE, quote=True)}">top-10% mass</th>
<th title="drop in target confidence, hottest 20% removed (see above)">faithfulness</th>
<th>image / sha256</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<script>{REPORT_SCRIPT}</script>
</body></html>
"""
