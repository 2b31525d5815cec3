"""Make the HTML report (reward, entropy, KL, ratio, mismatch, grad norm, length curves) of a run.

python scripts/plot_metrics.py outputs/debug_cpu/metrics.jsonl [-o report.html]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan_rl.report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "metrics", type=Path, help="a metrics.jsonl written by titan_rl.train, or the run's dump folder"
    )
    parser.add_argument("-o", "--output", type=Path, help="output HTML (default: report.html beside it)")
    args = parser.parse_args(argv)
    if args.metrics.is_dir() and (args.metrics / "metrics.jsonl").is_file():  # the run's dump folder
        args.metrics = args.metrics / "metrics.jsonl"
    if not args.metrics.is_file():
        what = "is a folder without metrics.jsonl" if args.metrics.is_dir() else "not found"
        print(f"error: {args.metrics} {what}", file=sys.stderr)
        return 1
    try:
        out = write_report(args.metrics, args.output or args.metrics.with_name("report.html"))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
