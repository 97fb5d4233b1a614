"""`holly-hpc bench render`: the rows, the output formats and the peak-memory measurement.

Speed is not asserted here (benchmarks measure it); memory is, because it is deterministic.
"""

from __future__ import annotations

import json

import pytest
import torch

from holly_hpc.bench.render import analytic_bytes, main, peak_bytes, run

TINY = {"batch": 2, "points": 10, "size": 16, "sigmas": [2.0], "devices": ["cpu"], "repeats": 1}
TINY_ARGS = ["--batch", "2", "--points", "10", "--size", "16", "--sigmas", "2", "--devices", "cpu", "--repeats", "1"]
KEYS = {"impl", "device", "batch", "points", "size", "sigma", "fwd_bwd_ms", "peak_mb"}


def test_rows_have_both_impls_with_the_requested_sizes():
    rows = run(**TINY)
    assert [r["impl"] for r in rows] == ["fast", "reference"]
    for r in rows:
        assert set(r) == KEYS
        assert (r["device"], r["batch"], r["points"], r["size"], r["sigma"]) == ("cpu", 2, 10, 16, 2.0)
        assert isinstance(r["fwd_bwd_ms"], float) and r["fwd_bwd_ms"] > 0
        assert isinstance(r["peak_mb"], float) and r["peak_mb"] > 0


def test_json_prints_only_the_rows(capsys):
    assert main([*TINY_ARGS, "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [(r["impl"], set(r)) for r in rows] == [("fast", KEYS), ("reference", KEYS)]
    assert "[bench render]" in captured.err  # progress goes to stderr


def test_table_lists_both_impls_ratios_and_how_memory_was_measured(capsys):
    assert main(TINY_ARGS) == 0
    out = capsys.readouterr().out
    header, fast, reference = out.splitlines()[:3]
    assert header.split() == [
        "impl",
        "device",
        "batch",
        "points",
        "size",
        "sigma",
        "fwd_bwd_ms",
        "peak_mb",
        "speedup",
        "mem_ratio",
    ]
    assert fast.split()[0] == "fast" and fast.split()[-1].endswith("x")
    assert reference.split()[0] == "reference"
    assert "profile_memory=True" in out and "target: fast ≥ 10x less peak memory" in out


def test_cuda_requested_without_cuda_is_an_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("cuda is available here")
    assert main([*TINY_ARGS[:-4], "--devices", "cuda", "--repeats", "1"]) == 2
    assert "cuda" in capsys.readouterr().err


def test_peak_is_the_running_maximum_of_known_allocations():
    def allocate():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 4 MB more: 8 MB held
        del a, b
        c = torch.ones(500, 1000)  # 2 MB, while nothing else is held
        return c.sum()

    peak = peak_bytes(allocate, "cpu")
    assert 8_000_000 <= peak < 8_000_000 * 1.01  # not the 10 MB allocated in total, nor the 0 B held at the end


def test_reference_needs_its_dense_tensor_and_far_more_than_fast():
    rows = run(batch=4, points=50, size=64, sigmas=[2.0], devices=["cpu"], repeats=1)
    peak = {r["impl"]: r["peak_mb"] * 1e6 for r in rows}
    dense = analytic_bytes("reference", 4, 50, 64)  # 4·50·64·64·4 B ≈ 3.3 MB
    assert peak["reference"] >= dense
    assert peak["fast"] >= analytic_bytes("fast", 4, 50, 64) * 0.9
    assert peak["reference"] > 10 * peak["fast"]
