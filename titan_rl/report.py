"""End-of-run report: a self-contained HTML page of metric curves (inline SVG, no dependencies)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

CURVES = [
    ("reward/mean", "mean reward"),
    ("entropy/mean", "entropy"),
    ("kl/mean", "KL to reference"),
    ("ratio/max", "max importance ratio"),
    ("ratio/min", "min importance ratio"),
    ("mismatch/logp_abs_mean", "|trainer - engine| log-prob"),
    ("grad_norm", "grad norm"),
    ("response_len/mean", "response length (tokens)"),
    ("loss", "loss"),
]
WIDTH, HEIGHT, PAD = 360, 180, 36


def read_metrics(path: str | Path) -> list[dict]:
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not a JSON object ({e.msg})") from None
    return rows


def _svg(points: list[tuple[float, float]], title: str) -> str:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD + (y - y0) / (y1 - y0) * (2 * PAD - HEIGHT)

    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
    return (
        f'<svg width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">'
        f'<rect width="100%" height="100%" fill="#fff" stroke="#ccc"/>'
        f'<text x="{PAD}" y="18" font-size="13" font-family="sans-serif">{html.escape(title)}</text>'
        f'<text x="4" y="{sy(y1) + 4:.0f}" font-size="10" font-family="monospace">{y1:.4g}</text>'
        f'<text x="4" y="{sy(y0) + 4:.0f}" font-size="10" font-family="monospace">{y0:.4g}</text>'
        f'<text x="{sx(x1) - 20:.0f}" y="{HEIGHT - 8}" font-size="10" font-family="monospace">'
        f"step {x1:g}</text>"
        f'<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{line}"/></svg>'
    )


def write_report(metrics_path: str | Path, out_path: str | Path, title: str = "titan_rl run") -> Path:
    """Curves of reward, entropy, KL, ratio, mismatch, grad norm, response length and loss."""
    rows = read_metrics(metrics_path)
    charts = []
    for key, label in CURVES:
        points = [
            (float(r["step"]), float(r[key]))
            for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if points:
            charts.append(_svg(points, f"{label} ({key})"))
    last = rows[-1] if rows else {}
    summary = ", ".join(f"{k} {last[k]:.4g}" for k, _ in CURVES if isinstance(last.get(k), (int, float)))
    page = (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<body style='font-family:sans-serif'><h2>{html.escape(title)}</h2>"
        f"<p>{len(rows)} steps; last step: {html.escape(summary)}</p>"
        f"<div style='display:flex;flex-wrap:wrap;gap:8px'>{''.join(charts)}</div></body>"
    )
    out = Path(out_path)
    out.write_text(page)
    return out
