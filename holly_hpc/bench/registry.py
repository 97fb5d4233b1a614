"""`holly-hpc bench registry`: concurrent writer processes logging metrics into a registry.

Each writer is a separate process, like an array task, logging `rows` metric rows in batches of `batch`
(the Trainer's reporter batches the same way), one short connection per batch. Afterwards the rows are
counted: `lost` must be 0. With a PostgreSQL URL the same load also runs against a temporary SQLite file,
printed beside it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
import uuid
from pathlib import Path

from ..registry import open_registry
from ..registry.urls import is_postgres


def _writer(url: str, experiment: str, index: int, rows: int, batch: int, start_at: float) -> None:
    registry = open_registry(url)
    while time.time() < start_at:  # every writer starts together
        time.sleep(0.001)
    for first in range(0, rows, batch):
        registry.log_metrics(
            experiment,
            index,
            [(step, "loss", float(step), time.time()) for step in range(first, min(first + batch, rows))],
        )


def measure(url: str, writers: int, rows: int, batch: int) -> dict:
    registry = open_registry(url)
    registry.init()
    experiment = f"bench-{uuid.uuid4().hex[:8]}"
    # One run per writer, as submit registers them: metrics of a run the registry does not hold are refused.
    registry.upsert_experiment(experiment, "", "", tempfile.gettempdir())
    registry.upsert_runs(
        experiment,
        [
            {"task_index": i, "task_id": f"{i:04d}-bench", "config": "{}", "config_hash": "", "seed": i, "out_dir": ""}
            for i in range(writers)
        ],
    )
    ctx = mp.get_context("spawn")
    start_at = time.time() + 3.0  # time for the interpreters to start
    procs = [ctx.Process(target=_writer, args=(url, experiment, i, rows, batch, start_at)) for i in range(writers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    elapsed = time.time() - start_at
    failed = sum(1 for p in procs if p.exitcode != 0)
    counted = registry.count_metrics(experiment)
    expected = writers * rows
    return {
        "backend": "postgresql" if is_postgres(url) else "sqlite",
        "writers": writers,
        "rows": counted,
        "rows_per_s": round(counted / elapsed, 1),
        "lost": expected - counted,
        "failed_writers": failed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="holly-hpc bench registry", description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="registry URL (default: a temporary SQLite file)")
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--rows", type=int, default=2000, help="metric rows per writer")
    parser.add_argument("--batch", type=int, default=200, help="rows per write")
    parser.add_argument("--json", action="store_true", help="print {writers, rows, rows_per_s, lost} rows as JSON only")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sqlite_url = f"sqlite:///{Path(tmp) / 'bench.sqlite'}"
        urls = [args.url] if args.url else []
        if not args.url or is_postgres(args.url):
            urls.append(sqlite_url)
        results = []
        for url in urls:
            print(
                f"  {len(results) + 1}/{len(urls)}: {args.writers} writers x {args.rows} rows ...",
                file=sys.stderr,
                flush=True,
            )
            results.append(measure(url, args.writers, args.rows, args.batch))
    if args.json:
        print(json.dumps([{k: r[k] for k in ("backend", "writers", "rows", "rows_per_s", "lost")} for r in results]))
    else:
        print(f"{'backend':11} {'writers':>7} {'rows':>8} {'rows/s':>9} {'lost':>5}")
        for r in results:
            print(f"{r['backend']:11} {r['writers']:>7} {r['rows']:>8} {r['rows_per_s']:>9} {r['lost']:>5}")
        print(f"(batches of {args.batch} rows, one short connection per batch, writers in separate processes)")
    return 0 if all(r["lost"] == 0 and r["failed_writers"] == 0 for r in results) else 1
