"""The run report: one chart per logged curve; a malformed metrics line is named."""

from __future__ import annotations

import json

import pytest

from titan_rl.report import write_report


def test_report_has_a_chart_per_curve(tmp_path):
    rows = [
        {"step": i, "reward/mean": i / 10, "entropy/mean": 2.0 - i / 10, "grad_norm": 1.0}
        for i in range(1, 6)
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    html = write_report(path, tmp_path / "report.html").read_text()
    assert html.count("<svg") == 3 and "5 steps" in html
    assert "kl/mean" not in html  # curves that were never logged are left out


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": \n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        write_report(path, tmp_path / "report.html")
