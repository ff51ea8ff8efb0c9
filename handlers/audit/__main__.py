"""``python -m handlers.audit report --since 24h --model NAME [--db PATH | --jsonl LOG] [--out report.html]``.

Renders a self-contained HTML report of audit records (:mod:`handlers.audit.report`). An offline
tool: model archives do not ship it.

Without ``--db`` or ``--jsonl`` the database is the first ``audit.sqlite3`` found where a worker writes
it when the model config names no ``directory`` (:func:`handlers.audit.sinks.resolve_directory`):
``$CAM_AUDIT_DIR``, ``$LOG_LOCATION/audit``, then ``logs/audit`` under the current directory and under
this checkout (``make serve`` runs TorchServe from the checkout with ``LOG_LOCATION=<checkout>/logs``),
then ``/tmp/torchserve-cam-audit``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .report import load_records, model_counts, parse_since, render_report
from .sinks import DB_NAME

__all__ = ["main", "default_databases"]

CHECKOUT = Path(__file__).resolve().parents[2]


def default_databases() -> list[Path]:
    """Where a worker's SQLite sink lands when the config names no directory, in the order looked at."""
    folders = []
    if os.environ.get("CAM_AUDIT_DIR"):
        folders.append(Path(os.environ["CAM_AUDIT_DIR"]))
    if os.environ.get("LOG_LOCATION"):
        folders.append(Path(os.environ["LOG_LOCATION"]) / "audit")
    folders += [Path.cwd() / "logs" / "audit", CHECKOUT / "logs" / "audit", Path("/tmp/torchserve-cam-audit")]
    return list(dict.fromkeys(folder.resolve() / DB_NAME for folder in folders))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m handlers.audit report ...``: 0 on success, 1 without a database or without the model's
    records (argparse exits 2)."""
    parser = argparse.ArgumentParser(prog="python -m handlers.audit", description="Prediction audit tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="render a self-contained HTML report of audit records")
    report.add_argument("--since", default="24h", help="30m, 24h, 7d or an ISO date/time (UTC); default 24h")
    report.add_argument("--model", default=None, help="only this model (default: every model)")
    source = report.add_mutually_exclusive_group()
    source.add_argument("--db", type=Path, help="the SQLite sink (default: where `make serve` writes, see below)")
    source.add_argument("--jsonl", type=Path, help="a log file holding the stdout sink's JSON lines")
    report.add_argument("--limit", type=int, default=2000, help="newest records shown at most (default 2000)")
    report.add_argument("--out", type=Path, default=Path("audit_report.html"), help="output HTML file")
    report.epilog = "default --db, the first that exists: " + ", ".join(map(str, default_databases()))
    args = parser.parse_args(argv)
    try:
        since = parse_since(args.since)
    except ValueError as error:
        parser.error(str(error))
    db = args.db
    if db is None and args.jsonl is None:
        candidates = default_databases()
        db = next((path for path in candidates if path.is_file()), None)
        if db is None:
            looked = "\n  ".join(map(str, candidates))
            print(f"no audit database found; looked at:\n  {looked}\npass --db PATH (the model config's "
                  "handler.audit.directory + /audit.sqlite3) or --jsonl LOG", file=sys.stderr)  # fmt: skip
            return 1
    elif db is not None and not Path(db).is_file():
        print(f"no audit database at {db}", file=sys.stderr)
        return 1
    source_name = db if db is not None else args.jsonl
    if args.model:
        held = model_counts(db=db, jsonl=args.jsonl)
        if args.model not in held:
            listed = ", ".join(f"{name} ({count} records)" for name, count in sorted(held.items())) or "no records at all"
            print(f"{source_name} holds no records of model {args.model!r}; it holds: {listed}", file=sys.stderr)
            return 1
    records = load_records(db=db, jsonl=args.jsonl, since=since, model=args.model, limit=args.limit)
    root = Path(db).resolve().parent if db is not None else None
    title = f"Prediction audit: {args.model or 'all models'}"
    args.out.write_text(render_report(records, root, title), encoding="utf-8")
    print(f"{len(records)} records from {source_name} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
