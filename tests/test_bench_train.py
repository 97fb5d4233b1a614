"""`holly-hpc bench train` and the bench CLI wiring (tiny sizes: this checks shape, not speed)."""

from __future__ import annotations

import json


def test_bench_train_json_rows(cli):
    code, out, err = cli(
        "bench",
        "train",
        "--image-size",
        "16",
        "--batch",
        "2",
        "--points",
        "10",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--devices",
        "cpu",
        "--json",
    )
    assert code == 0, err
    (row,) = json.loads(out)
    assert row["device"] == "cpu" and row["image_size"] == 16 and row["batch"] == 2 and row["points"] == 10
    assert row["steps"] == 2 and row["images_per_s"] > 0
    assert "images/s" in err  # progress goes to stderr


def test_bench_render_through_the_cli(cli):
    code, out, _ = cli(
        "bench",
        "render",
        "--batch",
        "1",
        "--points",
        "3",
        "--size",
        "8",
        "--sigmas",
        "1.5",
        "--repeats",
        "1",
        "--devices",
        "cpu",
        "--json",
    )
    assert code == 0
    rows = json.loads(out)
    assert {r["impl"] for r in rows} == {"fast", "reference"}
    assert all(set(r) == {"impl", "device", "batch", "points", "size", "sigma", "fwd_bwd_ms", "peak_mb"} for r in rows)


def test_bench_registry_writes_every_row_of_its_registered_runs(cli):
    code, out, err = cli("bench", "registry", "--writers", "2", "--rows", "30", "--batch", "10", "--json")
    assert code == 0, err
    (row,) = json.loads(out)
    assert row == {**row, "backend": "sqlite", "writers": 2, "rows": 60, "lost": 0} and row["rows_per_s"] > 0
