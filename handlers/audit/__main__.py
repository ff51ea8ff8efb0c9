"""The audit's offline tools (model archives do not ship them):

- ``python -m handlers.audit report --since 24h --model NAME [--db PATH | --dsn DSN | --jsonl LOG] [--out report.html]``
  renders a self-contained HTML report of audit records (:mod:`handlers.audit.report`);
- ``python -m handlers.audit migrate [--db PATH | --dsn DSN]`` applies the missing schema migrations
  (:mod:`handlers.audit.migrations`; a sink also does it when it opens);
- ``python -m handlers.audit prune --older-than 30d [--model NAME] [--db PATH | --dsn DSN]`` deletes older
  records with their heatmaps and inputs (rows and files together).

``--dsn`` defaults to ``$CAM_AUDIT_DSN`` when set (the PostgreSQL sink's own default).

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
from typing import Any

from .report import load_records, model_counts, parse_since, render_report
from .sinks import DB_NAME, SqliteSink

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


def _source_arguments(parser: argparse.ArgumentParser, jsonl: bool = False) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--db", type=Path, help="the SQLite sink (default: where `make serve` writes, see below)")
    source.add_argument("--dsn", default=None, help="the PostgreSQL sink (libpq string or URI; default $CAM_AUDIT_DSN)")
    if jsonl:
        source.add_argument("--jsonl", type=Path, help="a log file holding the stdout sink's JSON lines")
    parser.epilog = "default --db, the first that exists: " + ", ".join(map(str, default_databases()))


def _database(args: argparse.Namespace) -> tuple[Path | None, str | None, str | None]:
    """(SQLite path, DSN, error message) from ``--db``/``--dsn``/``$CAM_AUDIT_DSN``/the default databases."""
    if args.dsn:
        return None, args.dsn, None
    if args.db is None and getattr(args, "jsonl", None) is None:
        if os.environ.get("CAM_AUDIT_DSN"):
            return None, os.environ["CAM_AUDIT_DSN"], None
        candidates = default_databases()
        db = next((path for path in candidates if path.is_file()), None)
        if db is None:
            looked = "\n  ".join(map(str, candidates))
            return None, None, (f"no audit database found; looked at:\n  {looked}\npass --db PATH (the model config's "
                                "handler.audit.directory + /audit.sqlite3), --dsn DSN or --jsonl LOG")  # fmt: skip
        return db, None, None
    if args.db is not None and not Path(args.db).is_file():
        return None, None, f"no audit database at {args.db}"
    return args.db, None, None


def _sink(db: Path | None, dsn: str | None) -> Any:
    if dsn:
        from .postgres import PostgresSink

        return PostgresSink(dsn, busy_timeout_ms=30_000)
    assert db is not None, "a SQLite database path or a DSN"
    return SqliteSink(db.parent, busy_timeout_ms=30_000)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m handlers.audit report|migrate|prune ...``: 0 on success, 1 without a database or without the
    model's records (argparse exits 2)."""
    parser = argparse.ArgumentParser(prog="python -m handlers.audit", description="Prediction audit tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="render a self-contained HTML report of audit records")
    report.add_argument("--since", default="24h", help="30m, 24h, 7d or an ISO date/time (UTC); default 24h")
    report.add_argument("--model", default=None, help="only this model (default: every model)")
    _source_arguments(report, jsonl=True)
    report.add_argument("--limit", type=int, default=2000, help="newest records shown at most (default 2000)")
    report.add_argument("--out", type=Path, default=Path("audit_report.html"), help="output HTML file")
    migrate = commands.add_parser("migrate", help="apply the missing schema migrations")
    _source_arguments(migrate)
    prune = commands.add_parser("prune", help="delete records older than --older-than, with their heatmaps and inputs")
    prune.add_argument("--older-than", required=True, help="30d, 12h, 2w or an ISO date/time (UTC)")
    prune.add_argument("--model", default=None, help="only this model's records (default: every model)")
    _source_arguments(prune)
    args = parser.parse_args(argv)
    db, dsn, error = _database(args)
    if error:
        print(error, file=sys.stderr)
        return 1
    if args.command == "migrate":
        sink = _sink(db, dsn)
        try:
            applied = migrate_database(sink)
        finally:
            sink.close()
        print(f"{sink!r}: applied {applied}" if applied else f"{sink!r}: up to date")
        return 0
    if args.command == "prune":
        try:
            cutoff = parse_since(args.older_than)
        except ValueError as failure:
            parser.error(str(failure).replace("--since", "--older-than"))
        sink = _sink(db, dsn)
        try:
            deleted = sink.prune(cutoff, args.model)
        finally:
            sink.close()
        print(f"{sink!r}: pruned {deleted} record(s) older than {args.older_than}")
        return 0
    return _report(args, parser, db, dsn)


def migrate_database(sink: Any) -> list[int]:
    """Open ``sink`` without migrating, then migrate it: the versions applied."""
    if hasattr(sink, "dsn"):
        import psycopg

        from .postgres import migrate_postgres

        with psycopg.connect(sink.dsn, connect_timeout=10) as server:
            return migrate_postgres(server)
    import sqlite3

    from .migrations import migrate_sqlite

    connection = sqlite3.connect(sink.database, timeout=30, isolation_level=None)
    try:
        return migrate_sqlite(connection)
    finally:
        connection.close()


def _report(args: argparse.Namespace, parser: argparse.ArgumentParser, db: Path | None, dsn: str | None) -> int:
    try:
        since = parse_since(args.since)
    except ValueError as error:
        parser.error(str(error))
    source_name: str | Path | None
    if dsn:
        from .postgres import redact

        source_name = redact(dsn)
    else:
        source_name = db if db is not None else args.jsonl
    if args.model:
        held = model_counts(db=db, jsonl=args.jsonl, dsn=dsn)
        if args.model not in held:
            listed = ", ".join(f"{name} ({count} records)" for name, count in sorted(held.items())) or "no records at all"
            print(f"{source_name} holds no records of model {args.model!r}; it holds: {listed}", file=sys.stderr)
            return 1
    records = load_records(db=db, jsonl=args.jsonl, dsn=dsn, since=since, model=args.model, limit=args.limit)
    root = Path(db).resolve().parent if db is not None else None
    title = f"Prediction audit: {args.model or 'all models'}"
    args.out.write_text(render_report(records, root, title), encoding="utf-8")
    print(f"{len(records)} records from {source_name} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
