"""``python -m handlers.audit report --since 24h --model NAME [--db PATH | --jsonl LOG] [--out report.html]``.

Renders a self-contained HTML report of audit records (:mod:`handlers.audit.report`). An offline
tool: model archives do not ship it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .report import load_records, parse_since, render_report
from .sinks import DB_NAME, resolve_directory

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m handlers.audit report ...``: 0 on success, 1 without a database (argparse exits 2)."""
    parser = argparse.ArgumentParser(prog="python -m handlers.audit", description="Prediction audit tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="render a self-contained HTML report of audit records")
    report.add_argument("--since", default="24h", help="30m, 24h, 7d or an ISO date/time (UTC); default 24h")
    report.add_argument("--model", default=None, help="only this model (default: every model)")
    source = report.add_mutually_exclusive_group()
    source.add_argument("--db", type=Path, help=f"the SQLite sink (default: $CAM_AUDIT_DIR/{DB_NAME})")
    source.add_argument("--jsonl", type=Path, help="a log file holding the stdout sink's JSON lines")
    report.add_argument("--limit", type=int, default=2000, help="newest records shown at most (default 2000)")
    report.add_argument("--out", type=Path, default=Path("audit_report.html"), help="output HTML file")
    args = parser.parse_args(argv)
    try:
        since = parse_since(args.since)
    except ValueError as error:
        parser.error(str(error))
    db = args.db
    if db is None and args.jsonl is None:
        db = resolve_directory(None) / DB_NAME
    if db is not None and not Path(db).is_file():
        print(f"no audit database at {db}", file=sys.stderr)
        return 1
    records = load_records(db=db, jsonl=args.jsonl, since=since, model=args.model, limit=args.limit)
    root = Path(db).resolve().parent if db is not None else None
    title = f"Prediction audit: {args.model or 'all models'}"
    args.out.write_text(render_report(records, root, title), encoding="utf-8")
    print(f"{len(records)} records -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
